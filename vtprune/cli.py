"""`vtprune demo`, `vtprune viz` and `vtprune sweep`.

demo: the shipped demo model (``vtprune.demo_model``, trained by the project) answers held-out synthetic questions
unpruned and pruned by several selectors at several budgets; prints answers, visual tokens kept, prefill time and
speed-up side by side and writes PNGs of the kept patches. Prefill times come from ``vtprune._timing``: every
configuration is timed in the same interleaved rounds, threads pinned, median and p10-p90 reported, and a speed-up
the spread does not support is flagged. Then the shipped Meta-World robot policy (``vtprune.demo_policy``) runs a few
held-out episodes closed loop, unpruned and with ``vla_pruner`` at 25 %: success, control-step latency, and a strip of
one episode's camera frames with the kept patches.
viz: the same picture (and answer) for a user's image, model and method.
sweep: lmms-eval over methods x budgets plus the unpruned baseline (``vtprune.integrations.sweep``; the ``eval``
extra): one table and one plot of the metric vs visual tokens vs prefill time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import _timing


def _sample_items(name: str, n: int) -> list:
    """The demo's sample questions: held-out scenes 0..n-1 of the synthetic task (types cycle), at the model's
    image size."""
    from .demo_models import IMAGE_SIZE
    from .synth import dataset

    return dataset("heldout", n, seed=0, size=IMAGE_SIZE[name])


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=total < 2)


def run_demo(out: Path, ratios: list[float], methods: list[str], repeats: int, name: str = "llava",
             n_samples: int = 10, pictures: int = 3, threads: int = 1, warmup: int = 1) -> None:
    """Shipped demo model ``name``: answers to ``n_samples`` held-out questions unpruned and pruned by every method
    at every keep ratio, side by side with visual tokens, prefill time and speed-up; kept-patch PNGs in ``out``.

    All configurations are timed together (``_timing.measure``: interleaved rounds, so load on a shared machine hits
    each alike); speed-ups are ratios of medians from that one run, flagged where the spread does not support them.
    Torch threads are pinned to ``threads`` for the whole run and restored after (it may run inside a longer
    process, e.g. the tests).
    """
    with _timing.pinned_threads(threads):
        _run_demo(out, ratios, methods, repeats, name, n_samples, pictures, warmup)


def _run_demo(out: Path, ratios: list[float], methods: list[str], repeats: int, name: str, n_samples: int,
              pictures: int, warmup: int) -> None:
    import vtprune

    from .demo_models import build_prompt, demo_model, parse_answer, training_record
    from .viz import panel, stack

    out.mkdir(parents=True, exist_ok=True)
    model, proc = demo_model(name)
    rec = training_record(name)
    items = _sample_items(name, n_samples)
    tok = proc.tokenizer
    batch = proc(images=[it.image for it in items], text=[build_prompt(name, it.qa.question) for it in items],
                 return_tensors="pt", padding=True)
    one = proc(images=[items[0].image], text=[build_prompt(name, items[0].qa.question)], return_tensors="pt")
    n_params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    print(_timing.environment_line(_timing.environment(device, next(model.parameters()).dtype)))
    print(f"model: vtprune demo model {name!r} ({type(model).__name__}, {n_params / 1e6:.1f} M parameters, trained "
          f"from scratch by evals/train_tiny.py on {rec['device'].split(' (')[0]}; held-out accuracy "
          f"{rec['heldout']['accuracy']['all']['accuracy']:.1%} unpruned)")
    print(f"samples: {n_samples} held-out synthetic questions; speed: batch-1 forward (vision tower + LLM prefill)")
    print(_timing.method_line(repeats, warmup) + "\n")

    def answers() -> list[str]:
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        return [parse_answer(t) for t in tok.batch_decode(ids[:, batch["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]

    def forward() -> object:
        return model(**one)

    truth = [it.qa.answer for it in items]
    base = answers()
    n_vis = int((one["input_ids"] == model.config.image_token_id).sum())
    # (method, ratio label, "before->after", LLM FLOPs ratio, answers); the first row is the unpruned model
    rows: list[tuple[str, str, str, float, list[str]]] = [("none", "all", f"{n_vis}->{n_vis}", 1.0, base)]
    cases: dict[str, _timing.Case] = {"none": _timing.Case(forward)}
    at_smallest: dict[str, list[str]] = {"none": base}  # column label -> answers, at the smallest ratio
    panels: dict[int, list] = {}  # sample index -> one panel per (method, ratio)
    bar = _progress(len(methods) * len(ratios), "demo answers")
    for method in methods:
        for ratio in ratios:
            with _timing.pruned(model, method=method, keep_ratio=ratio):
                with torch.no_grad():
                    forward()
                    rep = vtprune.last_report(model)
                    for k, it in enumerate(items[:pictures]):
                        model(**proc(images=[it.image], text=[build_prompt(name, it.qa.question)],
                                     return_tensors="pt"))
                        imr = vtprune.last_report(model).images[0]
                        panels.setdefault(k, []).append(panel(it.image, imr, f"{method} {imr.n_after}/{imr.n_before}"))
                got = answers()
            im = rep.images[0]
            rows.append((method, f"{ratio:g}", f"{im.n_before}->{im.n_after}", rep.flops_ratio, got))
            # pruning and unpruning happen around each timed call, outside the timed region
            cases[f"{method}@{ratio:g}"] = _timing.Case(
                forward, lambda m=method, r=ratio: _timing.pruned(model, method=m, keep_ratio=r))
            if ratio == min(ratios):
                at_smallest[f"{method}@{im.n_after}"] = got
            panels[0][-1].save(out / f"kept_{method}_{ratio:g}.png")
            bar.update(1)
    bar.close()

    with torch.no_grad():
        stats = _timing.measure(cases, repeats=repeats, warmup=warmup, device=device)
    base_t = stats["none"]
    print(f"{'method':>10} {'ratio':>5} {'visual':>9} {'prefill ms':>10} {'p10-p90 ms':>11} {'speed-up':>9} "
          f"{'range':>10} {'LLM FLOPs':>9} {'correct':>8} {'same as unpruned':>16}")
    for (method, ratio, vis, fl, got), (label, st) in zip(rows, stats.items()):
        ok = sum(g == t for g, t in zip(got, truth))
        same = sum(g == b for g, b in zip(got, base))
        if label == "none":
            speed, rng = f"{1.0:.2f}x", ""
        else:
            r = _timing.ratio(base_t, st)
            speed, rng = str(r), f"{r.lo:.2f}-{r.hi:.2f}"
        print(f"{method:>10} {ratio:>5} {vis:>9} {st.median:>10.1f} {st.spread():>11} {speed:>9} {rng:>10} "
              f"{fl:>9.0%} {f'{ok}/{len(truth)}':>8} {f'{same}/{len(base)}':>16}")

    print("speed-up = median(none) / median(row), from the same interleaved run; range = [p10(none)/p90(row), "
          "p90(none)/p10(row)]; '~' / '?' as above")
    print(f"\nanswers (unpruned and at keep ratio {min(ratios):g}; * = wrong):")
    print(f"{'question':<34} {'truth':>7} " + " ".join(f"{c:>14}" for c in at_smallest))
    for i, it in enumerate(items):
        cells = " ".join(f"{got[i] + ('*' if got[i] != truth[i] else ''):>14}" for got in at_smallest.values())
        print(f"{it.qa.question:<34} {truth[i]:>7} {cells}")
    for k, ps in panels.items():
        stack(ps, columns=len(ratios)).save(out / f"kept_sample{k}.png")
    stack(panels[0], columns=len(ratios)).save(out / "kept_all.png")
    print(f"\npictures: {out}/kept_all.png (sample 0, one row per method), kept_sample<k>.png for samples "
          f"0..{len(panels) - 1}, kept_<method>_<ratio>.png")


def run_viz(image: Path, method: str, keep: int, model_name: str, out: Path, question: str) -> None:
    """Prune ``model_name`` ("llava" / "qwen2_vl" demo model, or a local model directory) with ``method`` at ``keep``
    tokens, answer ``question`` about ``image`` and draw the kept patches."""
    from PIL import Image

    import vtprune

    from .demo_models import DEMO_MODELS, IMAGE_SIZE, build_prompt, demo_model, parse_answer
    from .viz import panel

    img = Image.open(image).convert("RGB")
    if model_name in DEMO_MODELS:
        model, proc = demo_model(model_name)
        img = img.resize((IMAGE_SIZE[model_name],) * 2)
        prompt = build_prompt(model_name, question)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(model_name, local_files_only=True).eval()
        proc = AutoProcessor.from_pretrained(model_name, local_files_only=True)
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": question}]}],
                                          add_generation_prompt=True)
    inputs = proc(images=[img], text=[prompt], return_tensors="pt")
    tok = getattr(proc, "tokenizer", proc)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    vtprune.prune(model, method=method, keep=keep)
    try:
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        rep = vtprune.last_report(model)
    finally:
        vtprune.unprune(model)
    n = inputs["input_ids"].shape[1]
    print(rep)
    for label, x in (("unpruned", ref), (f"{method} keep {keep}", ids)):
        print(f"{label:>24}: {parse_answer(tok.decode(x[0, n:], skip_special_tokens=True))!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    panel(img, rep.images[0], f"{method} keep {rep.images[0].n_after}/{rep.images[0].n_before}").save(out)
    print(f"wrote {out}")


def run_robot_demo(out: Path, episodes: int = 2, keep_ratio: float = 0.25, repeats: int = 7, threads: int = 1,
                   steps_shown: int = 10) -> dict:
    """The shipped Meta-World policy (``vtprune.demo_policy``) closed loop on ``episodes`` held-out seeds per task,
    unpruned and with ``vla_pruner`` at ``keep_ratio`` of each camera's tokens: success, control-step latency (one
    batched step, both interleaved) and ``out/robot_episode.png``, the first pruned episode's corner camera at each
    control step with the kept patches (warm-up steps keep all)."""
    import vtprune

    from . import metaworld as mw
    from .demo_models import ASSETS, POLICY
    from .viz import overlay, stack

    with _timing.pinned_threads(threads):
        policy, proc = vtprune.demo_policy()
        rec = json.loads((ASSETS / POLICY / "training.json").read_text())
        tokens = proc.image_seq_length
        cfg = dict(method="vla_pruner", keep=max(1, round(keep_ratio * tokens)), layer=1)
        name = f"vla_pruner keep {cfg['keep']}/{tokens} per camera"
        print(f"\nrobot policy: the shipped Meta-World π0 ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f} M "
              f"parameters, {len(mw.CAMERAS)} cameras x {tokens} tokens; trained here in "
              f"{rec['seconds']['total'] / 60:.0f} min, held-out success "
              f"{', '.join(f'{t} {v:.2f}' for t, v in rec['held_out']['success'].items())})")
        jobs = [(t, mw.HELD_OUT_SEED + i) for t in mw.TASKS for i in range(episodes)]
        runs = {"unpruned": mw.rollout(policy, proc, jobs, envs=len(jobs))}
        vtprune.prune(policy, **cfg)
        try:
            runs[name] = mw.rollout(policy, proc, jobs, envs=len(jobs), keep_frames=True)
        finally:
            vtprune.unprune(policy)
        lat = mw.step_latency(policy, proc, {"unpruned": None, name: cfg}, envs=len(jobs), repeats=repeats)
    print(f"{'':>36} " + " ".join(f"{t:>24}" for t in mw.TASKS) + f" {'step ms (batch ' + str(len(jobs)) + ')':>18}"
          f" {'speed-up':>9}")
    for label, eps in runs.items():
        cells = [f"{sum(e.success for e in eps if e.task == t)}/{sum(e.task == t for e in eps)} solved"
                 for t in mw.TASKS]
        lt = lat[label]
        print(f"{label:>36} " + " ".join(f"{c:>24}" for c in cells) + f" {lt['median_ms']:>18.1f} "
              f"{lt['speedup']['ratio']:>8.2f}x{lt['speedup']['flag']}")
    ep = runs[name][0]
    side = int(round(tokens ** 0.5))
    tiles = []
    for i, (frames, kept) in enumerate(zip(ep.frames[:steps_shown], ep.kept)):
        grid = torch.zeros(tokens, dtype=torch.bool)
        grid[torch.tensor(kept[0])] = True
        tile = overlay(Image.fromarray(frames[0]), grid.view(side, side), size=168)
        label = "warm-up" if len(kept[0]) == tokens else f"{len(kept[0])}/{tokens}"
        ImageDraw.Draw(tile).text((3, 3), f"step {i}: {label}", fill=(255, 255, 255))
        tiles.append(tile)
    path = out / "robot_episode.png"
    out.mkdir(parents=True, exist_ok=True)
    stack(tiles, columns=5).save(path)
    print(f"picture: {path} ({ep.task}, seed {ep.seed}, {'solved' if ep.success else 'not solved'} in {ep.steps} "
          f"steps; corner camera, kept patches bright)")
    return {"runs": {k: [e.success for e in v] for k, v in runs.items()}, "latency": lat}


def _sweep(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    from .integrations.sweep import sweep

    try:
        keeps = [int(k) for k in a.keep.split(",") if k]
    except ValueError:
        p.error(f"--keep must be comma-separated integers, got {a.keep!r}")
    try:
        sweep(a.model, [m for m in a.methods.split(",") if m], keeps, [t for t in a.tasks.split(",") if t], a.out,
              a.base, a.limit, a.include_path, a.model_args, a.batch_size)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {a.out / 'sweep.md'}, {a.out / 'sweep.png'} and {a.out / 'sweep.json'}")
    print((a.out / "sweep.md").read_text())


def main(argv: list[str] | None = None) -> None:
    from .demo_models import DEMO_MODELS

    p = argparse.ArgumentParser(prog="vtprune", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the shipped demo model unpruned and pruned; answers, speed-ups, pictures")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--model", default="llava", choices=DEMO_MODELS, help="shipped demo model")
    d.add_argument("--ratios", default="0.5,0.25,0.11,0.05", help="comma-separated keep ratios of visual tokens")
    d.add_argument("--methods", default="fastervlm,divprune,holov,vflowopt,flowcut,random")
    d.add_argument("--samples", type=int, default=10, help="held-out questions answered per configuration")
    d.add_argument("--repeats", type=int, default=7, help="timed runs per configuration (interleaved rounds)")
    d.add_argument("--threads", type=int, default=1, help="torch intra-op threads, pinned and reported (1: steadiest "
                   "on a small or shared CPU, where a descheduled worker thread stalls the whole op)")
    d.add_argument("--robot-episodes", type=int, default=2, help="held-out episodes per Meta-World task for the robot "
                   "policy part (0: skip it)")
    v = sub.add_parser("viz", help="picture of the tokens a method keeps on your image")
    v.add_argument("image", type=Path)
    v.add_argument("--method", default="fastervlm")
    v.add_argument("--keep", type=int, default=28)
    v.add_argument("--model", default="llava", help="'llava' or 'qwen2_vl' (shipped demo models) or a local model "
                   "directory")
    v.add_argument("--question", default="what colour is the circle?")
    v.add_argument("--out", type=Path, default=Path("demo_out/viz.png"))
    w = sub.add_parser("sweep", help="lmms-eval over methods x budgets plus the unpruned baseline: a table and a plot")
    w.add_argument("--model", required=True, help="pretrained= of the runs: a directory, a hub id or vtprune:llava")
    w.add_argument("--methods", required=True, help="comma-separated vtprune methods")
    w.add_argument("--keep", required=True, help="comma-separated visual-token budgets per image")
    w.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks (the first one is plotted)")
    w.add_argument("--base", default=None, help="lmms-eval model class to wrap (default: per model family)")
    w.add_argument("--limit", type=int, default=None, help="documents per task (lmms-eval --limit)")
    w.add_argument("--batch-size", type=int, default=1)
    w.add_argument("--include-path", type=Path, default=None, help="extra task folder (default: the bundled tasks "
                   "of a source checkout)")
    w.add_argument("--model-args", default="", help="more model_args for every run, e.g. dtype=bfloat16")
    w.add_argument("--out", type=Path, default=Path("sweep_out"))
    a = p.parse_args(argv)
    if a.cmd == "sweep":
        _sweep(p, a)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import vtprune

    for m in a.methods.split(",") if a.cmd == "demo" else [a.method]:
        if m not in vtprune.list_methods():
            p.error(f"unknown method {m!r}; valid choices: {', '.join(vtprune.list_methods())}")
    if a.cmd == "demo":
        run_demo(a.out, [float(x) for x in a.ratios.split(",")], a.methods.split(","), a.repeats, a.model, a.samples,
                 threads=a.threads)
        if a.robot_episodes > 0:
            run_robot_demo(a.out, a.robot_episodes, repeats=a.repeats, threads=a.threads)
    else:
        run_viz(a.image, a.method, a.keep, a.model, a.out, a.question)


if __name__ == "__main__":
    main()
