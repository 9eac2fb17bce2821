"""DivPrune selection time: vtprune's vectorised greedy against a plain per-step greedy loop.

    python evals/bench_divprune.py [--device cpu|cuda] [--repeats 5] [--threads 1] [--quick]
                                   [--out evals/results/divprune_<device>.json]

Both sides are timed by ``vtprune._timing`` in the same run: interleaved rounds (so drift hits both), a warm-up
round first, threads pinned, median and p10-p90 per side, speed-ups as ratios of medians flagged ('~' / '?') where
the spread does not support them:

* ``vectorised``  ``vtprune.selectors.divprune.divprune_select``: distance matrix from the upper-triangle blocks
  only, nearest-neighbour minima fused into that pass, then ``keep`` steps of a running-min update with one
  gathered row each, no host synchronisation inside the loop;
* ``loop``        ``divprune_reference_loop``: one full matmul for the distances, then a Python loop that
  recomputes ``min`` over *all* selected rows at each step (``O(K^2 N)``) and reads each pick back with
  ``.item()``.

Columns ``end-to-end`` include the ``O(N^2 D)`` distance matrix (what a user pays). Columns ``greedy`` time only
the selection on an already computed ``[N, N]`` distance matrix (nearest-neighbour pass + ``keep`` steps), which is
where the two algorithms differ. Every case also checks that both return the same indices.

On CUDA each timed call is measured with CUDA events after a synchronise. Features are fp32 ``N(0, 1)``, seeded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vtprune import _timing  # noqa: E402
from vtprune.selectors.divprune import (  # noqa: E402
    cosine_distance,
    divprune_reference_loop,
    divprune_select,
    greedy_maxmin,
    reference_greedy_loop,
)

# (N, D, keep): LLaVA-1.5 (576 tokens) and LLaVA-NeXT (2880 = 5 x 576) with a 7B model's hidden size.
CASES = [(576, 4096, 64), (2880, 4096, 64), (2880, 4096, 320)]


@contextlib.contextmanager
def fresh_copy(src: torch.Tensor, holder: dict[str, torch.Tensor]) -> Iterator[None]:
    """Puts a new copy of ``src`` in ``holder["x"]`` before each call, outside the timing: both greedy functions
    write the distance matrix's diagonal in place, so no call may see another's leftovers."""
    holder["x"] = src.clone()
    yield


def run_case(n: int, d: int, keep: int, device: torch.device, repeats: int) -> tuple[dict, str]:
    """The JSON row of one case and its table line."""
    gen = torch.Generator().manual_seed(n * 1000 + keep)
    x = torch.randn(n, d, generator=gen).to(device)
    fast = divprune_select(x[None], keep)[0]
    slow = divprune_reference_loop(x, keep)
    same = bool(torch.equal(fast, slow))

    dist = cosine_distance(x[None])
    vec_in: dict[str, torch.Tensor] = {}
    loop_in: dict[str, torch.Tensor] = {}
    st = _timing.measure({
        "vectorised": lambda: divprune_select(x[None], keep),
        "loop": lambda: divprune_reference_loop(x, keep),
        "greedy_vectorised": _timing.Case(lambda: greedy_maxmin(vec_in["x"], keep),
                                          functools.partial(fresh_copy, dist, vec_in)),
        "greedy_loop": _timing.Case(lambda: reference_greedy_loop(loop_in["x"], keep),
                                    functools.partial(fresh_copy, dist[0], loop_in)),
    }, repeats=repeats, warmup=1, device=device)
    e2e, greedy = _timing.ratio(st["loop"], st["vectorised"]), _timing.ratio(st["greedy_loop"], st["greedy_vectorised"])
    e2e_vec, g_vec = st["vectorised"].median, st["greedy_vectorised"].median
    row = {
        "N": n, "D": d, "keep": keep,
        "vectorised_ms": round(e2e_vec, 3), "loop_ms": round(st["loop"].median, 3), "speedup": round(e2e.value, 2),
        "greedy_vectorised_ms": round(g_vec, 3), "greedy_loop_ms": round(st["greedy_loop"].median, 3),
        "greedy_speedup": round(greedy.value, 2),
        "matrix_share_of_vectorised": round(max(e2e_vec - g_vec, 0.0) / e2e_vec, 3),
        "same_indices": same,
        "timing": {k: v.to_dict() for k, v in st.items()},
        "ratios": {"speedup": e2e.to_dict(), "greedy_speedup": greedy.to_dict()},
    }
    line = (f"{n:>5} {d:>5} {keep:>4} | {e2e_vec:>13.2f} {st['vectorised'].spread():>13} {st['loop'].median:>9.2f} "
            f"{st['loop'].spread():>13} {e2e!s:>8} | {g_vec:>13.3f} {st['greedy_vectorised'].spread():>13} "
            f"{st['greedy_loop'].median:>14.3f} {st['greedy_loop'].spread():>13} {greedy!s:>8} | {same}")
    return row, line


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (interleaved rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, pinned and reported")
    parser.add_argument("--quick", action="store_true", help=f"only the first case {CASES[0]}")
    parser.add_argument("--out", default=None, help="JSON path (default evals/results/divprune_<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out or REPO / "evals" / "results" / f"divprune_{device.type}.json")
    _timing.pin_threads(args.threads)
    meta = {**_timing.environment(device), "repeats": args.repeats, "timing": _timing.method_line(args.repeats, 1)}
    print("DivPrune selection: vectorised vs plain per-step loop")
    print(_timing.environment_line(_timing.environment(device)))
    print(_timing.method_line(args.repeats, 1))
    head = (f"{'N':>5} {'D':>5} {'keep':>4} | {'vectorised ms':>13} {'p10-p90':>13} {'loop ms':>9} {'p10-p90':>13} "
            f"{'speedup':>8} | {'greedy vec ms':>13} {'p10-p90':>13} {'greedy loop ms':>14} {'p10-p90':>13} "
            f"{'speedup':>8} | same")
    print(head)
    print("-" * len(head))
    rows = []
    for n, d, keep in CASES[:1] if args.quick else CASES:
        row, line = run_case(n, d, keep, device, args.repeats)
        rows.append(row)
        print(line, flush=True)
    shares = ", ".join(f"{r['matrix_share_of_vectorised']:.0%}" for r in rows)
    print(f"note: the O(N^2 D) distance matrix, which both sides must compute, is {shares} of the vectorised "
          f"end-to-end time, so end-to-end speedup is bounded by it; 'greedy' columns time the selection alone.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    if not all(r["same_indices"] for r in rows):
        sys.exit("vectorised and loop picks differ")
    return rows


if __name__ == "__main__":
    main()
