"""What pruning inside the vision tower buys: FlowCut in the ViT vs the same budget selected after the full tower.

For each shape, side by side in one run (``vtprune._timing``: interleaved rounds after a warm-up, threads pinned,
median and p10-p90, ratios of medians flagged where the spread does not support them): the unpruned prefill forward
``model(**inputs)``, ``flowcut`` at its vision stage (the tower runs on fewer tokens after each FlowCut step), and
``random`` at ``pre_llm`` with the same budget (the full tower runs, then tokens are dropped). The LLM sees the same
number of visual tokens in both pruned runs, so ``flowcut / random`` is the tower time FlowCut saves net of its own
scoring, and ``unpruned / flowcut`` the whole prefill speed-up. InternVL images are cut into tiles that the tower
runs one at a time under FlowCut (each tile's cut amount depends on its own attention) and all at once unpruned;
the multi-tile shape shows what that costs. ``fc tower``: the tokens the tower processed under FlowCut, summed over
layers and tiles, as a fraction of the unpruned tower's (device-independent). Random weights at reduced widths
(speed only; 4 attention heads), plus the shipped trained LLaVA demo model. How much FlowCut cuts at each step
depends on the entropy of the attention, which random weights make high (near uniform), so random towers cut
late; the trained demo tower shows a real attention pattern.

    python evals/bench_flowcut_encoder.py [--repeats 15] [--threads 1] [--out evals/results/flowcut_encoder_cpu.json]
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
from vtprune import synth as S  # noqa: E402
from vtprune.demo_models import build_prompt, demo_model  # noqa: E402
from vtprune.testing import tiny_image, tiny_internvl, tiny_llava  # noqa: E402

#: name: (family, tile px, vision hidden, vision layers, text hidden, text layers, image (w, h), keep ratio);
#: "demo": the shipped, trained LLaVA demo model (its own sizes) on a held-out synthetic scene
SHAPES = {
    "demo-llava": ("demo", 224, 128, 4, 256, 3, (224, 224), 0.11),
    "llava-336": ("llava", 336, 384, 12, 512, 4, (336, 336), 0.11),
    "internvl-448x1": ("internvl", 448, 384, 12, 512, 4, (448, 448), 0.11),
    "internvl-448x3": ("internvl", 448, 384, 12, 512, 4, (896, 448), 0.11),
    # harness checks (tests): seconds, not minutes
    "tiny-llava": ("llava", 112, 64, 4, 128, 2, (112, 112), 0.25),
    "tiny-internvl": ("internvl", 112, 64, 4, 128, 2, (224, 112), 0.25),
}
DEFAULT = [s for s in SHAPES if not s.startswith("tiny")]
PROMPTS = {"llava": "USER: <image>\nWhat colour is the circle? ASSISTANT:",
           "internvl": "user: <IMG_CONTEXT>\nwhat colour is the circle? assistant:"}


def build(family: str, px: int, vh: int, vl: int, th: int, tl: int) -> tuple[torch.nn.Module, object]:
    if family == "demo":
        return demo_model("llava")
    if family == "llava":
        return tiny_llava("llava", image_size=px, vision_hidden=vh, vision_layers=vl, text_hidden=th, text_layers=tl)
    return tiny_internvl(image_size=px, vision_hidden=vh, vision_layers=vl, text_hidden=th, text_layers=tl,
                         max_patches=2)


def tower_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    n = model.config.vision_config.num_hidden_layers
    return next(m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


def tower_tokens(model: torch.nn.Module, inputs: dict) -> int:
    """Tokens summed over the tower's layers and tiles in one forward (the work the tower does, device-free)."""
    seen: list[int] = []
    # output hooks that run before vtprune's own (prepend): they see each layer's pruned sequence, not its refilled grid
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).shape[:2].numel()), prepend=True) for m in tower_layers(model)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen)


def run(repeats: int, shapes: list[str]) -> list[dict]:
    rows = []
    for name in shapes:
        family, px, vh, vl, th, tl, (w, h), ratio = SHAPES[name]
        model, proc = build(family, px, vh, vl, th, tl)
        if family == "demo":
            it = S.item("heldout", 0, size=px)
            inputs = proc(images=[it.image], text=[build_prompt("llava", it.qa.question)], return_tensors="pt")
        else:
            inputs = proc(images=[tiny_image(w, h)], text=[PROMPTS[family]], return_tensors="pt")
        n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
        keep = max(1, round(ratio * n_vis))
        tiles = int(inputs["pixel_values"].shape[0])
        forward = functools.partial(model, **inputs)
        stages = {}
        with torch.no_grad():
            for method in ("flowcut", "random"):  # untimed check: each ran at its stage and kept exactly the budget
                with _timing.pruned(model, method=method, keep=keep):  # random: pre_llm, its only stage
                    forward()
                    rep = vtprune.last_report(model)
                stages[method] = rep.stage
                assert rep.images[0].n_after == keep, (method, rep.images[0].n_after, keep)
            cases: dict[str, _timing.Case] = {"none": _timing.Case(forward)}
            for method in ("flowcut", "random"):  # pruned around each call, outside the timed region
                ctx = functools.partial(_timing.pruned, model, method=method, keep=keep)
                cases[method] = _timing.Case(forward, ctx)
            st = _timing.measure(cases, repeats=repeats, warmup=1)
        fc_vs_rnd = _timing.ratio(st["flowcut"], st["random"])
        sp_fc, sp_rnd = _timing.ratio(st["none"], st["flowcut"]), _timing.ratio(st["none"], st["random"])
        full_work = tower_tokens(model, inputs)
        vtprune.prune(model, method="flowcut", keep=keep)
        try:
            fc_work = tower_tokens(model, inputs) / full_work
        finally:
            vtprune.unprune(model)
        vc, tc = model.config.vision_config, model.config.text_config
        row = dict(shape=name, family=family, tiles=tiles, visual_tokens=n_vis, keep=keep,
                   vision=f"h{vc.hidden_size} x {vc.num_hidden_layers} layers, {px} px tiles",
                   llm=f"h{tc.hidden_size} x {tc.num_hidden_layers} layers",
                   unpruned_ms=st["none"].median, flowcut_ms=st["flowcut"].median,
                   random_pre_llm_ms=st["random"].median,
                   timing={k: v.to_dict() for k, v in st.items()},
                   flowcut_stage=stages["flowcut"], flowcut_tower_tokens=round(fc_work, 3),
                   flowcut_vs_random=fc_vs_rnd.value, speedup_flowcut=sp_fc.value, speedup_random=sp_rnd.value,
                   ratios={"flowcut_vs_random": fc_vs_rnd.to_dict(), "speedup_flowcut": sp_fc.to_dict(),
                           "speedup_random": sp_rnd.to_dict()})
        rows.append(row)
        cells = " ".join(f"{st[m].median:>7.1f} {st[m].spread():>13}" for m in ("none", "flowcut", "random"))
        print(f"{name:>15} {tiles:>5} {n_vis:>6} {keep:>5} {cells} {fc_vs_rnd!s:>10} {sp_fc!s:>10} {sp_rnd!s:>10} "
              f"{fc_work:>9.2f}  ({stages['flowcut']})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per variant (interleaved rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, pinned and reported")
    ap.add_argument("--shapes", default=",".join(DEFAULT), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--out", type=Path, default=Path("evals/results/flowcut_encoder_cpu.json"))
    a = ap.parse_args(argv)
    shapes = a.shapes.split(",")
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise SystemExit(f"unknown shape(s) {bad}; valid: {', '.join(SHAPES)}")
    _timing.pin_threads(a.threads)
    env = _timing.environment()
    print(_timing.environment_line(env) + " | batch 1, prefill forward")
    print(_timing.method_line(a.repeats, 1))
    print(f"{'shape':>15} {'tiles':>5} {'visual':>6} {'keep':>5} " + " ".join(
        f"{c + ' ms':>7} {'p10-p90':>13}" for c in ("none", "flowcut", "random")) +
        f" {'fc/random':>10} {'fc speedup':>10} {'rnd speedup':>10} {'fc tower':>9}")
    res = {"env": env, "timing": _timing.method_line(a.repeats, 1), "rows": run(a.repeats, shapes)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
