"""Overhead of vtprune's pre-LLM pipeline vs an oracle fed the kept tokens directly.

For each selector: time of `model(**inputs)` with vtprune (vision tower + selection + rewrite + LLM on kept tokens)
vs the oracle: the same vision features computed by the model's own `get_image_features` and the same kept tokens
injected through `mm_encoder_outputs` with compacted ids and positions prepared in advance (the cost a perfect
integration would pay). Ratios are measured side by side in one run. Goal: ≤ 1.05×.

    python evals/bench_overhead.py [--repeats 7] [--out evals/results/overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtprune  # noqa: E402
from vtprune.cli import _time_ms as _time  # noqa: E402
from vtprune.testing import tiny_llava  # noqa: E402

SHAPES = {
    # name: (image size, vision hidden, vision layers, text hidden, text layers)
    "small": (112, 64, 2, 128, 2),    # 64 visual tokens
    "mid": (336, 128, 2, 512, 8),     # 576 visual tokens, LLaVA-1.5 layout
}


def oracle_inputs(model, inputs, report):
    """Compacted ids/mask/positions and kept indices taken from a pruned run, prepared ahead of time."""
    tm = report.token_map
    pad = tm < 0
    ids = inputs["input_ids"].gather(1, tm.clamp(min=0)).masked_fill(pad, 0)
    mask = inputs["attention_mask"].gather(1, tm.clamp(min=0)).masked_fill(pad, 0)
    pos = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"]).gather(1, tm.clamp(min=0))
    return ids, mask, pos, [im.kept for im in report.images]


def run(repeats: int) -> dict:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    rows = []
    for name, (size, vh, vl, th, tl) in SHAPES.items():
        model, proc = tiny_llava("llava", image_size=size, vision_hidden=vh, vision_layers=vl, text_hidden=th,
                                 text_layers=tl)
        from vtprune.cli import scene

        inputs = proc(images=[scene(size)], text=["USER: <image>\nWhat colour is the circle? ASSISTANT:"],
                      return_tensors="pt")
        n_vis = (size // 14) ** 2
        keep = max(1, n_vis // 9)  # ~11 %, as LLaVA-1.5 at 64 tokens
        # the oracle injects kept features before the LLM, so this compares the pre_llm methods
        pre_llm = [m for m in vtprune.list_methods() if "pre_llm" in vtprune.registry.get_selector(m).stages]
        for method in pre_llm:
            vtprune.prune(model, method=method, keep=keep)
            with torch.no_grad():
                model(**inputs)
                rep = vtprune.last_report(model)
                ids, mask, pos, kept = oracle_inputs(model, inputs, rep)

                def oracle(model=model, inputs=inputs, ids=ids, mask=mask, pos=pos, kept=kept):
                    f = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
                    feats = [x[k] for x, k in zip(f.pooler_output, kept)]
                    enc = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
                    return model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs=enc)

                with vtprune.disabled(model):
                    ref = oracle().logits
                out = model(**inputs).logits
                assert torch.allclose(out, ref, atol=1e-5), "oracle and pruned pipeline disagree"
                # interleave the two timings so drift on a shared machine hits both alike
                t_pruned, t_oracle = [], []

                def pruned(model=model, inputs=inputs):
                    return model(**inputs)

                for _ in range(repeats):
                    t_pruned.append(_time(pruned, 1))
                    with vtprune.disabled(model):
                        t_oracle.append(_time(oracle, 1))
                with vtprune.disabled(model):
                    t_full = _time(pruned, max(1, repeats // 2))
            p, o = statistics.median(t_pruned), statistics.median(t_oracle)
            rows.append(dict(shape=name, visual_tokens=n_vis, keep=keep, method=method, pruned_ms=p, oracle_ms=o,
                             ratio=p / o, unpruned_ms=t_full, speedup_vs_unpruned=t_full / p,
                             selector_ms=rep.selector_ms))
            print(f"{name:>6} {n_vis:>6} {keep:>5} {method:>10} {p:>10.2f} {o:>10.2f} {p / o:>7.3f}x "
                  f"{rep.selector_ms:>9.2f} {t_full:>11.2f} {t_full / p:>7.2f}x", flush=True)
            vtprune.unprune(model)
    return {"rows": rows}


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="evals/results/overhead_cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    env = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else
               f"CPU {platform.processor() or platform.machine()}", threads=torch.get_num_threads(),
               python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               dtype="float32", batch=1)
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"{'shape':>6} {'visual':>6} {'keep':>5} {'method':>10} {'pruned ms':>10} {'oracle ms':>10} {'ratio':>8} "
          f"{'select ms':>9} {'unpruned ms':>11} {'speedup':>8}")
    res = run(a.repeats)
    res["env"] = env
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
