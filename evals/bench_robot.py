"""Closed-loop success and control-step latency of the shipped Meta-World policy vs the visual-token budget.

The policy is ``vtprune.demo_policy()`` (a tiny π0 trained here by ``evals/train_policy.py``; two cameras of 64
SigLIP tokens each). Every point runs the same held-out episodes (seeds from ``HELD_OUT_SEED``, ``--episodes`` per
task, the same start noise per control call) closed loop, ``--envs`` vectorised environments per batch:

* ``unpruned`` and ``blank`` (unpruned, black frames: how much the policy needs to see);
* per method x budget (50 / 25 / 12.5 % of each camera's tokens): ``vla_pruner`` and ``fastv`` inside the VLM from
  layer 1 of 4 (vla_pruner with its default window: its first steps per episode are unpruned warm-up), ``divprune``,
  ``random``, ``uniform`` and ``fastervlm`` (SigLIP has no [CLS]: the substitute signal) before it.

Success is counted per task; the latency of one control step (``sample_actions`` on a batch of ``--envs``
observations of the same episodes) is timed separately, all variants interleaved (``vtprune._timing``). Points run
in ``--workers`` processes of one thread each (rendering is single-threaded).

    python evals/bench_robot.py [--episodes 50] [--envs 8] [--workers 2] [--out evals/results/robot_cpu.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtprune  # noqa: E402
from vtprune import _timing  # noqa: E402
from vtprune import metaworld as mw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policy import budget_axis  # noqa: E402

BUDGETS = (0.5, 0.25, 0.125)
PRE_LLM = ("divprune", "random", "uniform", "fastervlm")
IN_LLM = ("vla_pruner", "fastv")
LAYER = 1
EXECUTE = mw.EXECUTE
GOAL = "vla_pruner at 25 % keeps >= 98 % of unpruned success and beats every other method at 12.5 %"


def config_of(method: str, keep: int) -> dict[str, Any]:
    return dict(method=method, keep=keep, **({"layer": LAYER} if method in IN_LLM else {}))


def points(tokens: int) -> list[dict[str, Any]]:
    """Every point, the goal's budgets first (a run cut short still answers the goal)."""
    out = [dict(name="unpruned", method="none", budget=1.0), dict(name="blank", method="none", budget=1.0, blank=True)]
    for b in (0.25, 0.125, 0.5):
        for m in IN_LLM + PRE_LLM:
            out.append(dict(name=f"{m}@{b:g}", method=m, budget=b, keep=max(1, round(b * tokens))))
    return out


def run_point(p: dict[str, Any], episodes: int, envs: int, path: str | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    policy, proc = vtprune.demo_policy(path)
    if p["method"] != "none":
        vtprune.prune(policy, **config_of(p["method"], p["keep"]))
    jobs = [(t, mw.HELD_OUT_SEED + i) for t in mw.TASKS for i in range(episodes)]
    t0 = time.perf_counter()
    eps = mw.rollout(policy, proc, jobs, envs=envs, execute=EXECUTE, blank=p.get("blank", False))
    per_task = {t: [bool(e.success) for e in sorted(eps, key=lambda e: e.seed) if e.task == t] for t in mw.TASKS}
    kept = [len(c) for e in eps for step in e.kept if step is not None for c in step]
    return dict(p, success=float(np.mean([e.success for e in eps])),
                success_per_task={t: float(np.mean(v)) for t, v in per_task.items()}, outcomes=per_task,
                episodes=len(eps), mean_env_steps=float(np.mean([e.steps for e in eps])),
                kept_tokens_per_camera=dict(min=min(kept), max=max(kept)) if kept else None,
                seconds=time.perf_counter() - t0)


def latency(pts: list[dict[str, Any]], envs: int, repeats: int, path: str | None) -> dict[str, Any]:
    """One control step of every point but ``blank``, interleaved, one thread (``vtprune.metaworld.step_latency``)."""
    torch.set_num_threads(1)
    policy, proc = vtprune.demo_policy(path)
    configs = {p["name"]: None if p["method"] == "none" else config_of(p["method"], p["keep"])
               for p in pts if not p.get("blank")}
    return mw.step_latency(policy, proc, configs, envs=envs, repeats=repeats)


def plot(res: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib is not importable ({e})"
    pts = res["points"]
    base = next(p for p in pts if p["name"] == "unpruned")
    blank = next((p for p in pts if p["name"] == "blank"), None)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in IN_LLM + PRE_LLM:
        ps = sorted((p for p in pts if p["method"] == m), key=lambda p: -p["budget"])
        if not ps:
            continue
        xs = [1.0] + [p["budget"] for p in ps]
        a1.plot(xs, [base["success"]] + [p["success"] for p in ps], marker="o", label=m, lw=2.5 if m == "vla_pruner"
                else 1.2)
        lat = res["latency"]
        a2.plot(xs, [lat["unpruned"]["median_ms"]] + [lat[p["name"]]["median_ms"] for p in ps], marker="o", label=m)
    if blank is not None:
        a1.axhline(blank["success"], color="k", ls=":", lw=1, label="unpruned, black frames")
    budget_axis(a1, "success rate (held-out episodes)")
    budget_axis(a2, "control step, ms (median, batch of envs)")
    a1.set_ylim(0, 1.02)
    env = res["env"]
    fig.suptitle(f"shipped Meta-World π0 ({', '.join(mw.TASKS)}), {res['episodes_per_point']} episodes per point | "
                 f"{env['device']} | torch {env['torch']} | transformers {env['transformers']} | fp32", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=50, help="held-out episodes per task and point")
    ap.add_argument("--envs", type=int, default=8, help="vectorised environments per batch")
    ap.add_argument("--workers", type=int, default=2, help="processes running points in parallel")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per variant for the latency")
    ap.add_argument("--policy", default=None, help="a policy directory (default: the shipped one)")
    ap.add_argument("--only", default=None, help="comma list of point names (e.g. unpruned,vla_pruner@0.25)")
    ap.add_argument("--out", type=Path, default=Path("evals/results/robot_cpu.json"))
    ap.add_argument("--finalize", action="store_true", help="write the results of a stopped run from its .partial.json")
    a = ap.parse_args(argv)
    tokens = vtprune.demo_policy(a.policy)[1].image_seq_length
    pts = points(tokens)
    if a.only:
        names = a.only.split(",")
        if bad := [n for n in names if n not in {p["name"] for p in pts}]:
            raise SystemExit(f"unknown point(s) {bad}; valid: {', '.join(p['name'] for p in pts)}")
        pts = [p for p in pts if p["name"] in names or p["name"] == "unpruned"]
    if a.finalize:  # a run stopped early: report the points it finished, and name the others
        part = json.loads(a.out.with_suffix(".partial.json").read_text())
        return report(a, part["env"], part["points"], part["latency"], pts, part.get("seconds"))
    env = {**_timing.environment(), "threads": "1 per worker", "workers": str(a.workers)}
    print(_timing.environment_line(env))
    t0 = time.perf_counter()
    # latency first, on an otherwise idle machine (the rollouts' worker processes would share its cores)
    print("latency (one control step, interleaved):", flush=True)
    lat = latency(pts, a.envs, a.repeats, a.policy)
    run = functools.partial(run_point, episodes=a.episodes, envs=a.envs, path=a.policy)
    results: list[dict[str, Any]] = []
    order = {p["name"]: i for i, p in enumerate(pts)}

    def done(r: dict[str, Any]) -> None:
        results.append(r)
        results.sort(key=lambda x: order[x["name"]])
        print(f"  {r['name']:>18}: success {r['success']:.3f} "
              f"({', '.join(f'{v:.2f}' for v in r['success_per_task'].values())}) {r['seconds']:.0f} s", flush=True)
        partial = dict(env=env, partial=True, episodes_per_task=a.episodes, points=results, latency=lat,
                       seconds=time.perf_counter() - t0)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=1))

    if a.workers > 1:
        with mp.get_context("spawn").Pool(a.workers) as pool:
            for r in pool.imap_unordered(run, pts):
                done(r)
    else:
        for p in pts:
            done(run(p))
    return report(a, env, results, lat, pts, time.perf_counter() - t0)


def report(a: argparse.Namespace, env: dict[str, str], results: list[dict[str, Any]], lat: dict[str, Any],
           pts: list[dict[str, Any]], wall_s: float | None) -> dict[str, Any]:
    base = next(r for r in results if r["name"] == "unpruned")
    for r in results:
        r["success_vs_unpruned"] = r["success"] / base["success"] if base["success"] else None
    missing = [p["name"] for p in pts if p["name"] not in {r["name"] for r in results}]
    res = dict(env=env, policy=a.policy or "shipped (vtprune.demo_policy())", tasks=mw.TASKS, layer=LAYER,
               execute=EXECUTE, envs=a.envs, episodes_per_task=a.episodes,
               episodes_per_point=a.episodes * len(mw.TASKS),
               first_seed=mw.HELD_OUT_SEED, points=results, not_run=missing, latency=lat, goal=GOAL,
               goal_verdict=goal(results), timing=_timing.method_line(a.repeats, 1), wall_s=wall_s)
    print(f"{'point':>18} {'success':>8} {'vs unpruned':>11} {'per task':>20} {'step ms':>8} {'p10-p90':>13} "
          f"{'speed-up':>9}")
    for r in results:
        lt = lat.get(r["name"])
        rel = f"{r['success_vs_unpruned']:.3f}" if r["success_vs_unpruned"] is not None else "-"
        tail = (f"{lt['median_ms']:>8.1f} {lt['p10_ms']:>6.1f}-{lt['p90_ms']:<6.1f} "
                f"{lt['speedup']['ratio']:>7.2f}x{lt['speedup']['flag']}") if lt else ""
        print(f"{r['name']:>18} {r['success']:>8.3f} {rel:>11} "
              f"{' '.join(f'{v:.2f}' for v in r['success_per_task'].values()):>20} {tail}")
    if missing:
        print(f"NOT RUN (the run was stopped before them): {', '.join(missing)}")
    print("goal: " + GOAL + "\n  " + "\n  ".join(res["goal_verdict"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    res["plot"] = plot(res, a.out.with_suffix(".png"))
    print(f"wrote {a.out}; {res['plot']}; {wall_s or float('nan'):.0f} s")
    return res


def goal(results: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in results}
    lines = []
    base = by.get("unpruned")
    v25 = by.get("vla_pruner@0.25")
    if base and v25:
        rel = v25["success"] / base["success"] if base["success"] else float("nan")
        lines.append(f"vla_pruner@25%: {v25['success']:.3f} vs unpruned {base['success']:.3f} = {rel:.3f} of it -> "
                     f"{'meets' if rel >= 0.98 else 'misses'} >= 0.98")
    v12 = by.get("vla_pruner@0.125")
    if v12:
        others = {n: r["success"] for n, r in by.items() if n.endswith("@0.125") and n != "vla_pruner@0.125"}
        best = max(others.items(), key=lambda kv: kv[1]) if others else None
        absent = [m for m in IN_LLM + PRE_LLM if m != "vla_pruner" and f"{m}@0.125" not in by]
        if best:
            verdict = ("misses" if any(v12["success"] <= s for s in others.values()) else
                       f"not established ({', '.join(absent)} not run)" if absent else "meets")
            lines.append(f"vla_pruner@12.5%: {v12['success']:.3f}; best other method run {best[0]} {best[1]:.3f} -> "
                         f"{verdict}")
    return lines


if __name__ == "__main__":
    main()
