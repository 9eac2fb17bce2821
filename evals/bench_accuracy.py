"""Accuracy vs visual-token budget of the shipped demo models on held-out synthetic visual QA.

For every model (``llava``, ``qwen2_vl``), every registered selector at its own stage, keep ratios
1.0 / 0.5 / 0.25 / 0.11 / 0.05 of the 256 visual tokens and positions ``preserve`` / ``compact``: prune with
``vtprune.prune(model, method=m, keep_ratio=r, positions=p)``, answer the held-out questions with greedy
``generate`` (batched, left padding) and score the first word of each answer, per question type and overall.

Stages: a selector with a ``pre_llm`` stage runs there; ``flowcut`` runs at ``vision`` (inside the ViT; on Qwen2-VL,
whose ViT has no [CLS], vtprune runs its LLM-stage variant at ``llm:2``; records carry the stage that ran); the
in-LLM methods (``fastv``, ``pdrop``, ``atp``) run at ``llm:1`` (the demo LMs have 3 layers, so FastV's K=2 default
for 32-layer models would sit at the last layer), the schedule methods with ``schedule=[(1, r)]``; in-LLM stages
only preserve positions (vtprune refuses ``compact`` there). A configuration a family cannot run (e.g.
``globalcom2`` without crops) is printed as not applicable with vtprune's error, and has no record.

    python evals/bench_accuracy.py                      # full run -> evals/results/accuracy.{json,png}
    python evals/bench_accuracy.py --models llava --n 100
    python evals/bench_accuracy.py --quick --out /tmp/acc.json   # tiny subset: harness check

Writes a list of records ``{"model", "method", "stage", "positions", "keep_ratio", "question_type", "accuracy",
"n", "visual_tokens"}`` (``visual_tokens``: kept per image, the mean over the images; ``question_type`` "all" =
overall; ``method`` "none" with ``keep_ratio`` 1.0 = the unpruned model). Records of models not run this time are
kept from an existing output file, so the models can be run one at a time. Device and versions are printed and
written into the plot's title.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtprune  # noqa: E402
from vtprune import synth as S  # noqa: E402
from vtprune.demo_models import DEMO_MODELS, IMAGE_SIZE, build_prompt, demo_model, parse_answer  # noqa: E402
from vtprune.registry import get_selector  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (1.0, 0.5, 0.25, 0.11, 0.05)
POSITIONS = ("preserve", "compact")
LLM_LAYER = 1


def stage_of(method: str) -> str:
    """The stage the benchmark runs ``method`` at: pre_llm if it has one, else vision, else llm:LLM_LAYER."""
    stages = get_selector(method).stages
    return "pre_llm" if "pre_llm" in stages else "vision" if "vision" in stages else f"llm:{LLM_LAYER}"


def prune_kwargs(method: str, ratio: float, positions: str) -> dict[str, Any] | None:
    """Arguments of ``vtprune.prune`` for one configuration, or None if the stage refuses ``positions``."""
    stage = stage_of(method)
    if not stage.startswith("llm:"):
        return {"method": method, "keep_ratio": ratio, "positions": positions}
    if positions != "preserve":
        return None
    if get_selector(method).schedule:
        return {"method": method, "schedule": [(LLM_LAYER, ratio)]}
    return {"method": method, "keep_ratio": ratio, "layer": LLM_LAYER}


def header() -> str:
    import transformers

    return (f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads) | python "
            f"{platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} | "
            "float32, greedy")


class Harness:
    """A demo model with its held-out items, processed once and answered under any pruning config."""

    def __init__(self, name: str, n: int, batch: int = 16, seed: int = 0, path: str | Path | None = None):
        self.name = name
        self.model, self.processor = demo_model(name, path)
        self.items = S.dataset("heldout", n, seed=seed, size=IMAGE_SIZE[name])
        self.inputs = []
        for i in range(0, n, batch):
            chunk = self.items[i:i + batch]
            self.inputs.append(self.processor(images=[it.image for it in chunk], return_tensors="pt", padding=True,
                                              text=[build_prompt(name, it.qa.question) for it in chunk]))
        self.n_visual = int((self.inputs[0]["input_ids"][0] == self.model.config.image_token_id).sum())
        self.not_applicable: dict[str, str] = {}

    @torch.no_grad()
    def predict(self) -> tuple[list[str], float]:
        """Answers to every item with the model as it is now (pruned or not) and the visual tokens kept per image,
        averaged over the images (``atp`` keeps a different number for each)."""
        tok = self.processor.tokenizer
        preds, kept = [], []
        self.stage = "none"
        for inputs in self.inputs:
            ids = self.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
            preds += [parse_answer(t) for t in tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]
            if vtprune.is_pruned(self.model) and vtprune.last_report(self.model) is not None:
                rep = vtprune.last_report(self.model)
                kept += [im.n_after for im in rep.images]
                self.stage = rep.stage
        return preds, round(sum(kept) / len(kept), 1) if kept else float(self.n_visual)

    def records(self, method: str, positions: str, ratio: float) -> list[dict[str, Any]]:
        """Accuracy records (per question type and "all") of one configuration; [] if not applicable."""
        t0 = time.time()
        if method == "none":
            preds, kept = self.predict()
            stage = "none"
        else:
            kwargs = prune_kwargs(method, ratio, positions)
            if kwargs is None:
                return []
            try:
                vtprune.prune(self.model, **kwargs)
                try:
                    preds, kept = self.predict()
                finally:
                    vtprune.unprune(self.model)
            except (ValueError, NotImplementedError) as e:
                msg = str(e).splitlines()[0]
                self.not_applicable.setdefault((method, positions), msg)
                print(f"{self.name:>8} {method:>9} {positions:>8} {ratio:>5} not applicable: {msg}", flush=True)
                return []
            stage = self.stage  # where vtprune ran it (FlowCut moves into the LLM on families without a vision stage)
        out = []
        for t in ("all", *S.QUESTION_TYPES):
            hits = [p == it.qa.answer for p, it in zip(preds, self.items) if t in ("all", it.qa.qtype)]
            if hits:
                out.append({"model": self.name, "method": method, "stage": stage, "positions": positions,
                            "keep_ratio": ratio, "question_type": t, "accuracy": round(sum(hits) / len(hits), 4),
                            "n": len(hits), "visual_tokens": kept})
        acc = {r["question_type"]: r["accuracy"] for r in out}
        print(f"{self.name:>8} {method:>9} {stage:>7} {positions:>8} {ratio:>5} {kept:>6.1f} tok | "
              + " ".join(f"{t} {a:.3f}" for t, a in acc.items()) + f" | {time.time() - t0:.1f} s", flush=True)
        return out


def run(models: list[str], n: int, methods: list[str], ratios: list[float], positions: list[str], batch: int,
        seed: int = 0, path: str | Path | None = None) -> list[dict[str, Any]]:
    """All records for ``models`` (unpruned baseline first, then every method x positions x ratio)."""
    recs: list[dict[str, Any]] = []
    for name in models:
        h = Harness(name, n, batch, seed, path=None if path is None else Path(path) / name)
        recs += h.records("none", "none", 1.0)
        for m in methods:
            for p in positions:
                for r in ratios:
                    recs += h.records(m, p, r)
                    if (m, p) in h.not_applicable:
                        break
        for (m, p), msg in h.not_applicable.items():
            print(f"{name}: {m} with positions={p} not applicable: {msg}")
    return recs


def merge(out: Path, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New records plus those of other models already in ``out``."""
    models = {r["model"] for r in recs}
    old = json.loads(out.read_text()) if out.is_file() else []
    return [r for r in old if r["model"] not in models] + recs


def plot(recs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy vs keep ratio: one row per model, one column per question type; matplotlib, else PIL."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(recs, path, title)
        return
    models = sorted({r["model"] for r in recs}, key=lambda m: DEMO_MODELS.index(m) if m in DEMO_MODELS else 9)
    types = ["all", *S.QUESTION_TYPES]
    methods = sorted({r["method"] for r in recs} - {"none"})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(len(models), len(types), figsize=(3.1 * len(types), 2.9 * len(models)), squeeze=False,
                             sharey=True)
    for i, model in enumerate(models):
        for j, t in enumerate(types):
            ax = axes[i][j]
            sel = [r for r in recs if r["model"] == model and r["question_type"] == t]
            base = [r["accuracy"] for r in sel if r["method"] == "none"]
            if base:
                ax.axhline(base[0], color="k", ls=":", lw=1, label="unpruned")
            for m in methods:
                for pos, ls in (("preserve", "-"), ("compact", "--")):
                    pts = sorted((r["keep_ratio"], r["accuracy"]) for r in sel if r["method"] == m
                                 and r["positions"] == pos)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, color=colors[m],
                                label=f"{m} ({pos})")
            ax.set_xscale("log")
            ax.set_xticks(list(RATIOS), [f"{r:g}" for r in RATIOS], fontsize=7)
            ax.minorticks_off()
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"{model}: {t}", fontsize=9)
            if j == 0:
                ax.set_ylabel("accuracy")
            if i == len(models) - 1:
                ax.set_xlabel("keep ratio of visual tokens")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(9, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pil(recs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Fallback plot without matplotlib: same grid, drawn with PIL."""
    import math

    from PIL import Image, ImageDraw

    models = sorted({r["model"] for r in recs})
    types = ["all", *S.QUESTION_TYPES]
    methods = sorted({r["method"] for r in recs} - {"none"})
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0)]
    cw, ch, pad = 220, 180, 30
    img = Image.new("RGB", (cw * len(types), ch * len(models) + 60), "white")
    d = ImageDraw.Draw(img)
    d.text((5, 3), title, fill="black")
    lo, hi = math.log(min(RATIOS)), math.log(max(RATIOS))
    for i, model in enumerate(models):
        for j, t in enumerate(types):
            x0, y0 = j * cw + pad, i * ch + 20 + pad
            w, h = cw - 2 * pad, ch - 2 * pad
            d.rectangle([x0, y0, x0 + w, y0 + h], outline=(160, 160, 160))
            d.text((x0, y0 - 14), f"{model}: {t}", fill="black")

            def xy(r: float, a: float, x0: int = x0, y0: int = y0, w: int = w, h: int = h) -> tuple[float, float]:
                return x0 + w * (math.log(r) - lo) / (hi - lo), y0 + h * (1 - a)

            sel = [r for r in recs if r["model"] == model and r["question_type"] == t]
            for r in sel:
                if r["method"] == "none":
                    d.line([xy(min(RATIOS), r["accuracy"]), xy(max(RATIOS), r["accuracy"])], fill="black")
            for k, m in enumerate(methods):
                for pos in POSITIONS:
                    pts = sorted((r["keep_ratio"], r["accuracy"]) for r in sel if r["method"] == m
                                 and r["positions"] == pos)
                    if len(pts) > 1:
                        d.line([xy(*p) for p in pts], fill=palette[k % len(palette)], width=2 if pos == "preserve"
                               else 1)
    for k, m in enumerate(methods):
        d.text((10 + 120 * k, ch * len(models) + 40), m, fill=palette[k % len(palette)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def summary(recs: list[dict[str, Any]]) -> str:
    """Plain-text table: overall accuracy per model / method / positions across keep ratios."""
    lines = []
    for model in sorted({r["model"] for r in recs}):
        base = [r["accuracy"] for r in recs if r["model"] == model and r["method"] == "none"
                and r["question_type"] == "all"]
        lines.append(f"{model}: unpruned {base[0]:.3f}" if base else model)
        ratios = sorted({r["keep_ratio"] for r in recs if r["model"] == model and r["method"] != "none"},
                        reverse=True)
        lines.append(f"  {'method':>10} {'positions':>9} " + " ".join(f"{r:>6g}" for r in ratios))
        for m in sorted({r["method"] for r in recs if r["model"] == model} - {"none"}):
            for p in POSITIONS:
                acc = {r["keep_ratio"]: r["accuracy"] for r in recs if r["model"] == model and r["method"] == m
                       and r["positions"] == p and r["question_type"] == "all"}
                if acc:
                    lines.append(f"  {m:>10} {p:>9} " + " ".join(f"{acc.get(r, float('nan')):>6.3f}"
                                                                   for r in ratios))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ok = vtprune.list_methods()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(DEMO_MODELS))
    p.add_argument("--n", type=int, default=250, help="held-out questions per model (balanced over 5 types)")
    p.add_argument("--methods", default=",".join(ok))
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    p.add_argument("--positions", default=",".join(POSITIONS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--assets", type=Path, default=None, help="load <assets>/<model> instead of the shipped models")
    p.add_argument("--quick", action="store_true", help="tiny subset: 10 questions, random + uniform, ratio 0.25")
    p.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the --out path with .png)")
    a = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.n, a.methods, a.ratios, a.positions = min(a.n, 10), "random,uniform", "0.25", "preserve"
    models = [m for m in a.models.split(",") if m]
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in ok]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {ok}")
    print(header(), flush=True)
    recs = run(models, a.n, methods, [float(r) for r in a.ratios.split(",")], a.positions.split(","), a.batch,
               a.seed, a.assets)
    allrecs = merge(a.out, recs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(allrecs, indent=1))
    n_per = {m: next(r["n"] for r in allrecs if r["model"] == m and r["question_type"] == "all")
             for m in sorted({r["model"] for r in allrecs})}
    plot(allrecs, a.plot or a.out.with_suffix(".png"),
         "vtprune demo models, held-out synthetic VQA (n per model: " + ", ".join(f"{m} {k}" for m, k in
                                                                                 n_per.items()) + ") | " + header())
    print(summary(allrecs))
    print(f"wrote {a.out} and {a.plot or a.out.with_suffix('.png')}")
    return allrecs


if __name__ == "__main__":
    main()
