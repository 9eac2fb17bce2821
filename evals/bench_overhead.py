"""Overhead of vtprune's pre-LLM pipeline vs an oracle fed the kept tokens directly.

For each selector: time of `model(**inputs)` with vtprune (vision tower + selection + rewrite + LLM on kept tokens)
vs the oracle: the same vision features computed by the model's own `get_image_features` and the same kept tokens
injected through `mm_encoder_outputs` with compacted ids and positions prepared in advance (the cost a perfect
integration would pay), and vs the unpruned forward. Goal: pruned / oracle <= 1.05x.

Timing by ``vtprune._timing``: the three variants of a (shape, method) run in interleaved rounds after a warm-up
(pruning and unpruning happen around each pruned call, untimed), threads pinned, median and p10-p90 per variant,
ratios of medians from the same run, flagged ('~' / '?') where the spread does not support them.

    python evals/bench_overhead.py [--repeats 7] [--threads 1] [--shapes small,mid] [--methods ...]
                                   [--out evals/results/overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtprune  # noqa: E402
from vtprune import _timing  # noqa: E402
from vtprune.synth import item  # noqa: E402
from vtprune.testing import tiny_llava  # noqa: E402

SHAPES = {
    # name: (image size, vision hidden, vision layers, text hidden, text layers)
    "small": (112, 64, 2, 128, 2),    # 64 visual tokens
    "mid": (336, 128, 2, 512, 8),     # 576 visual tokens, LLaVA-1.5 layout
}
#: pre_llm selectors that keep a subset of the tower's tokens (what the oracle can reproduce; vflowopt merges
#: dropped tokens into summaries and globalcom2 needs crops, so neither has this oracle)
METHODS = ("fastervlm", "divprune", "random", "uniform", "holov")


def oracle_inputs(inputs: dict, report: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Compacted ids/mask/positions and kept indices taken from a pruned run, prepared ahead of time."""
    tm = report.token_map
    pad = tm < 0
    ids = inputs["input_ids"].gather(1, tm.clamp(min=0)).masked_fill(pad, 0)
    mask = inputs["attention_mask"].gather(1, tm.clamp(min=0)).masked_fill(pad, 0)
    pos = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"]).gather(1, tm.clamp(min=0))
    return ids, mask, pos, [im.kept for im in report.images]


def oracle_forward(model: torch.nn.Module, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   pos: torch.Tensor, kept: list) -> object:
    """The unpruned model's own feature extraction, then only the kept features injected with prepared inputs."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    f = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    enc = {"image": BaseModelOutputWithPooling(pooler_output=[x[k] for x, k in zip(f.pooler_output, kept)])}
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, mm_encoder_outputs=enc)


def run(repeats: int, shapes: list[str], methods: list[str]) -> dict:
    rows = []
    for name in shapes:
        size, vh, vl, th, tl = SHAPES[name]
        model, proc = tiny_llava("llava", image_size=size, vision_hidden=vh, vision_layers=vl, text_hidden=th,
                                 text_layers=tl)
        inputs = proc(images=[item("heldout", 0, size=size).image],
                      text=["USER: <image>\nWhat colour is the circle? ASSISTANT:"], return_tensors="pt")
        n_vis = (size // 14) ** 2
        keep = max(1, n_vis // 9)  # ~11 %, as LLaVA-1.5 at 64 tokens
        forward = functools.partial(model, **inputs)
        for method in methods:
            with torch.no_grad():
                with _timing.pruned(model, method=method, keep=keep):
                    out = forward().logits
                    rep = vtprune.last_report(model)
                ids, mask, pos, kept = oracle_inputs(inputs, rep)

                oracle = functools.partial(oracle_forward, model, inputs["pixel_values"], ids, mask, pos, kept)
                assert torch.allclose(out, oracle().logits, atol=1e-5), f"{method}: oracle and pruned pipeline disagree"
                st = _timing.measure({
                    "pruned": _timing.Case(forward, functools.partial(_timing.pruned, model, method=method, keep=keep)),
                    "oracle": oracle,
                    "unpruned": forward,
                }, repeats=repeats, warmup=1)
            over, speed = _timing.ratio(st["pruned"], st["oracle"]), _timing.ratio(st["unpruned"], st["pruned"])
            p, o, u = st["pruned"], st["oracle"], st["unpruned"]
            rows.append(dict(shape=name, visual_tokens=n_vis, keep=keep, method=method, pruned_ms=p.median,
                             oracle_ms=o.median, ratio=over.value, unpruned_ms=u.median,
                             speedup_vs_unpruned=speed.value,
                             selector_ms=rep.selector_ms, timing={k: v.to_dict() for k, v in st.items()},
                             ratios={"pruned_vs_oracle": over.to_dict(), "speedup_vs_unpruned": speed.to_dict()}))
            print(f"{name:>6} {n_vis:>6} {keep:>5} {method:>10} {p.median:>9.2f} {p.spread():>11} {o.median:>9.2f} "
                  f"{o.spread():>11} {over!s:>8} {rep.selector_ms:>9.2f} {u.median:>11.2f} {u.spread():>11} "
                  f"{speed!s:>8}", flush=True)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per variant (interleaved rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, pinned and reported")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of subset-keeping pre_llm selectors")
    ap.add_argument("--out", default="evals/results/overhead_cpu.json")
    a = ap.parse_args(argv)
    shapes, methods = a.shapes.split(","), a.methods.split(",")
    if bad := [s for s in shapes if s not in SHAPES]:
        raise SystemExit(f"unknown shape(s) {bad}; valid: {', '.join(SHAPES)}")
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"method(s) {bad} have no oracle here; valid: {', '.join(METHODS)}")
    _timing.pin_threads(a.threads)
    env = {**_timing.environment(), "batch": "1"}
    print(_timing.environment_line(env))
    print(_timing.method_line(a.repeats, 1))
    print(f"{'shape':>6} {'visual':>6} {'keep':>5} {'method':>10} {'pruned ms':>9} {'p10-p90':>11} {'oracle ms':>9} "
          f"{'p10-p90':>11} {'ratio':>8} {'select ms':>9} {'unpruned ms':>11} {'p10-p90':>11} {'speedup':>8}")
    res = {**run(a.repeats, shapes, methods), "env": env, "timing": _timing.method_line(a.repeats, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
