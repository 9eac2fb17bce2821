"""``vtprune sweep``: lmms-eval over a grid of methods x budgets (plus the unpruned baseline), one table, one plot.

    vtprune sweep --model vtprune:llava --methods divprune,fastv --keep 28,64,128 --tasks vtprune_synth224

Every point is one in-process lmms-eval run (``simple_evaluate``) of ``--model vtprune`` with
``base=<--base>,pretrained=<--model>,method=<m>,keep=<k>``; the baseline is ``method=none``. Per point the table has
the task metric, the visual tokens per image entering the LLM and the mean prefill time (vision + selection + LLM
prefill per model call), read from the results' ``throughput`` block. Writes ``<out>/sweep.json`` (every run's
point), ``<out>/sweep.md`` (the table) and ``<out>/sweep.png`` (metric vs visual tokens, metric vs prefill time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: the task folder of a source checkout (the bundled ``vtprune_synth`` tasks), used when it exists
REPO_TASKS = Path(__file__).resolve().parents[2] / "evals" / "tasks"


def _metric(res: dict[str, Any], task: str) -> tuple[str, float]:
    """The task's headline metric: ``acc`` if it has one, else its first numeric non-stderr metric."""
    row = res["results"][task]
    names = [k for k, v in row.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"]
    if not names:
        raise ValueError(f"task {task!r} reported no numeric metric: {row}")
    name = next((k for k in names if k.split(",")[0] == "acc"), names[0])
    return name.split(",")[0], float(row[name])


def run_point(model: str, method: str, keep: int | None, tasks: list[str], base: str | None, limit: int | None,
              include_path: Path | None, extra_args: str = "", batch_size: int = 1) -> dict[str, Any]:
    """One lmms-eval run; its metric per task, visual tokens and prefill time."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    args = [f"pretrained={model}", f"method={method}"]
    if base:
        args.insert(0, f"base={base}")
    if keep is not None:
        args.append(f"keep={keep}")
    if extra_args:
        args.append(extra_args)
    model_args = ",".join(args)
    tm = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    res = simple_evaluate(model="vtprune", model_args=model_args, tasks=tasks, limit=limit, batch_size=batch_size,
                          task_manager=tm)
    if res is None:
        raise RuntimeError(f"lmms-eval returned no results for {model_args}")
    tp = res.get("throughput") or {}
    metrics = {t: _metric(res, t) for t in tasks}
    return {"method": method, "keep": keep, "model_args": model_args,
            "visual_tokens": tp.get("avg_vtprune_visual_tokens_after"),
            "visual_tokens_before": tp.get("avg_vtprune_visual_tokens_before"),
            "prefill_ms": tp.get("avg_vtprune_prefill_ms"), "world_size": tp.get("avg_vtprune_world_size"),
            "metrics": {t: {"name": n, "value": v} for t, (n, v) in metrics.items()}}


def table(points: list[dict[str, Any]], tasks: list[str]) -> str:
    """Markdown table: one row per point (baseline first), one metric column per task."""
    head = "| method | keep | visual tokens | prefill ms | " + " | ".join(
        f"{t} ({points[0]['metrics'][t]['name']})" for t in tasks) + " |"
    rows = [head, "|" + "---|" * (4 + len(tasks))]
    for p in points:
        vt = "" if p["visual_tokens"] is None else f"{p['visual_tokens']:.1f}"
        ms = "" if p["prefill_ms"] is None else f"{p['prefill_ms']:.1f}"
        rows.append(f"| {p['method']} | {'' if p['keep'] is None else p['keep']} | {vt} | {ms} | "
                    + " | ".join(f"{p['metrics'][t]['value']:.4f}" for t in tasks) + " |")
    return "\n".join(rows) + "\n"


def plot(points: list[dict[str, Any]], task: str, path: Path, title: str) -> None:
    """Two panels for ``task``'s metric: vs visual tokens per image, and vs prefill time; a line per method, the
    unpruned baseline as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    name = points[0]["metrics"][task]["name"]
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != "none"]
    for ax, x, label in ((axes[0], "visual_tokens", "visual tokens per image entering the LLM"),
                         (axes[1], "prefill_ms", "prefill time per model call (ms)")):
        for p in points:
            if p["method"] == "none" and p[x] is not None:
                ax.plot([p[x]], [p["metrics"][task]["value"]], "k*", ms=12, label="unpruned")
        for m in methods:
            pts = sorted((p[x], p["metrics"][task]["value"]) for p in points if p["method"] == m and p[x] is not None)
            if pts:
                ax.plot([q[0] for q in pts], [q[1] for q in pts], "o-", label=m)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{task} {name}")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(model: str, methods: list[str], keeps: list[int], tasks: list[str], out: Path, base: str | None = None,
          limit: int | None = None, include_path: Path | None = None, extra_args: str = "",
          batch_size: int = 1) -> list[dict[str, Any]]:
    """The unpruned baseline, then every method x keep; writes ``sweep.json``, ``sweep.md`` and ``sweep.png``
    under ``out`` and returns the points."""
    from tqdm import tqdm

    import vtprune

    bad = [m for m in methods if m not in vtprune.list_methods()]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid choices: {', '.join(vtprune.list_methods())}")
    if not methods or not keeps or not tasks:
        raise ValueError("sweep needs at least one method, one keep value and one task")
    if include_path is None and REPO_TASKS.is_dir():
        include_path = REPO_TASKS
    from .lmms_eval import preflight

    preflight(tasks, include_path)  # a dataset an offline run cannot load is named before any model loads
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    grid: list[tuple[str, int | None]] = [("none", None)] + [(m, k) for m in methods for k in keeps]
    points = []
    bar = tqdm(grid, desc="vtprune sweep", unit="run")
    for method, keep in bar:
        bar.set_postfix_str(f"{method} keep={keep}" if keep is not None else "unpruned")
        points.append(run_point(model, method, keep, tasks, base, limit, include_path, extra_args, batch_size))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(points, indent=1))
    (out / "sweep.md").write_text(table(points, tasks))
    plot(points, tasks[0], out / "sweep.png", f"{model} | base {base or 'default'} | limit {limit}")
    return points
