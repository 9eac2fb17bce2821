"""Bandwidth of vtprune's token gather and KV-cache compaction against torch and a plain copy.

    python evals/bench_kernels.py [--quick] [--out evals/results/kernels_<device>.json] [--dtypes fp16,bf16]

For every case it reports GB/s (bytes read + bytes written; index bytes included for the gathers) of:

* ``triton``       the Triton kernel (``vtprune.kernels.triton_gather``); for KV, all layers in one launch
* ``triton_loop``  KV only: the same kernel launched once per cache tensor (what fusing the layers saves)
* ``reference``    vtprune's torch reference (the ``torch`` backend): ``index_select`` for B=1, ``gather`` otherwise
* ``index_select`` ``torch.index_select`` on the flattened ``[B*N, D]`` rows with precomputed batch offsets
  (the fastest torch gather; no bounds safety across batch rows); KV: per-tensor ``index_select`` along S, B=1 only
* ``adv_index``    ``x[arange(B)[:, None], index]`` (gather only)
* ``copy``         ``dst.copy_(src)`` of the same number of output bytes, contiguous: the bandwidth ceiling

and, from the same run, ``triton / copy`` (% of copy bandwidth) and ``index_select time / triton time`` (speedup).

Timing by ``vtprune._timing``: the columns of one case run in interleaved rounds after warm-up rounds, threads
pinned, GB/s from the median, ``spread`` = the widest p10-p90 of the row's columns as % of its median, ratios of
medians flagged ('~' / '?') where the spread does not support them. On CUDA: CUDA events after a synchronise, L2
flushed (256 MiB write) before every call, untimed, so that numbers are DRAM bandwidth. On CPU: ``time.perf_counter``,
small repeat counts, and the Triton columns are skipped unless ``TRITON_INTERPRET=1`` (the interpreter: correctness
only, its timings mean nothing); KV cases use B=1 only on CPU to stay under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vtprune import _timing  # noqa: E402
from vtprune.kernels import reference  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class GatherCase:
    model: str
    B: int
    N: int
    D: int
    K: int


@dataclass
class KVCase:
    model: str
    B: int
    H: int
    S: int
    Dh: int
    layers: int  # cache tensors = 2 * layers (K and V)
    K: int


@dataclass
class Timer:
    device: torch.device
    warmup: int
    repeats: int
    flush: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            # Bigger than H100/H200 L2 (50 MiB): every timed call reads its inputs from DRAM, as in a real forward.
            self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)

    @contextlib.contextmanager
    def _flushed(self) -> Iterator[None]:
        if self.flush is not None:
            self.flush.zero_()  # queued before the timer's synchronise, so it is not timed
        yield

    def __call__(self, fns: dict[str, Callable[[], object]]) -> dict[str, _timing.Stats]:
        """Stats of every ``fn``, interleaved (one round runs each once), L2 flushed before each call on CUDA."""
        cases = {name: _timing.Case(fn, self._flushed) for name, fn in fns.items()}
        return _timing.measure(cases, repeats=self.repeats, warmup=self.warmup, device=self.device)


def gather_cases(quick: bool) -> list[GatherCase]:
    llava_n = 576 + 60  # 576 image tokens + ~60 text tokens
    specs = [
        ("llava-1.5-7b", llava_n, 4096, [64, 144, 192]),
        ("llava-next-7b", 2880, 4096, [320, 640]),
        ("qwen2-vl-7b", 1200, 3584, [128, 300, 600]),
    ]
    if quick:
        specs = [("llava-1.5-7b", llava_n, 4096, [144]), ("llava-next-7b", 2880, 4096, [640]),
                 ("qwen2-vl-7b", 1200, 3584, [300])]  # fmt: skip
    return [GatherCase(m, B, n, d, k) for m, n, d, ks in specs for B in (1, 8) for k in ks]


def kv_cases(quick: bool, batches: tuple[int, ...]) -> list[KVCase]:
    # Kept KV positions = kept image tokens + the text tokens (the prefix/suffix text is never pruned).
    specs = [
        ("llava-1.5-7b", 32, 576 + 60, 128, 32, [64 + 60, 144 + 60, 192 + 60]),
        ("qwen2-vl-7b", 4, 1200 + 60, 128, 28, [128 + 60, 300 + 60, 600 + 60]),
    ]
    if quick:
        specs = [(m, h, s, dh, n, ks[1:2]) for m, h, s, dh, n, ks in specs]
    return [KVCase(m, B, h, s, dh, n, k) for m, h, s, dh, n, ks in specs for B in batches for k in ks]


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bench_gather(
    case: GatherCase, dtype: torch.dtype, device: torch.device, timer: Timer, tg: ModuleType | None
) -> dict:
    B, N, D, K = case.B, case.N, case.D, case.K
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    index = torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)]).to(device)
    flat_index = (index + torch.arange(B, device=device)[:, None] * N).flatten()
    rows = x.view(B * N, D)
    bidx = torch.arange(B, device=device)[:, None]
    out_elems = B * K * D
    nbytes = 2 * out_elems * x.element_size() + index.numel() * index.element_size()
    src, dst = x.view(-1)[:out_elems], torch.empty(out_elems, dtype=dtype, device=device)

    fns: dict[str, Callable[[], object]] = {}
    if tg is not None:
        fns["triton"] = lambda: tg.gather_tokens(x, index)
    fns["reference"] = lambda: reference.gather_tokens(x, index)
    fns["index_select"] = lambda: rows.index_select(0, flat_index)
    fns["adv_index"] = lambda: x[bidx, index]
    fns["copy"] = lambda: dst.copy_(src)
    st = timer(fns)
    copy_bytes = 2 * out_elems * x.element_size()

    exact = None
    if tg is not None:
        exact = torch.equal(tg.gather_tokens(x, index), reference.gather_tokens(x, index))
    row = {"kind": "gather", **vars(case), "bytes": nbytes, "exact": exact}
    add_timings(row, st, {name: copy_bytes if name == "copy" else nbytes for name in st})
    return row


def bench_kv(case: KVCase, dtype: torch.dtype, device: torch.device, timer: Timer, tg: ModuleType | None) -> dict:
    B, H, S, Dh, K = case.B, case.H, case.S, case.Dh, case.K
    n_tensors = 2 * case.layers
    g = torch.Generator(device="cpu").manual_seed(0)
    caches = [torch.empty(B, H, S, Dh, dtype=dtype, device=device).normal_() for _ in range(n_tensors)]
    index = torch.stack([torch.randperm(S, generator=g)[:K].sort().values for _ in range(B)]).to(device)
    out_elems = n_tensors * B * H * K * Dh
    elem = caches[0].element_size()
    nbytes = 2 * out_elems * elem + index.numel() * index.element_size()
    copy_src = torch.empty(out_elems, dtype=dtype, device=device)
    copy_dst = torch.empty_like(copy_src)

    fns: dict[str, Callable[[], object]] = {}
    if tg is not None:
        fns["triton"] = lambda: tg.compact_kv_stacked(caches, index)
        fns["triton_loop"] = lambda: [tg.compact_kv_stacked([c], index) for c in caches]
    fns["reference"] = lambda: reference.compact_kv_stacked(caches, index)
    if B == 1:
        fns["index_select"] = lambda: [c.index_select(2, index[0]) for c in caches]
    fns["copy"] = lambda: copy_dst.copy_(copy_src)
    st = timer(fns)

    exact = None
    if tg is not None:
        exact = torch.equal(tg.compact_kv_stacked(caches, index), reference.compact_kv_stacked(caches, index))
    row = {"kind": "kv", **vars(case), "tensors": n_tensors, "bytes": nbytes, "exact": exact}
    add_timings(row, st, {name: 2 * out_elems * elem if name == "copy" else nbytes for name in st})
    return row


def add_timings(row: dict, st: dict[str, _timing.Stats], nbytes: dict[str, int]) -> None:
    """``row["methods"]``: median ms, p10/p90 and GB/s (of the median) per column; ``row["spread_pct"]``: the widest
    p10-p90 as % of its median; ``row["ratios"]``: ratios of medians from this run, each with its flag."""
    row["methods"] = {name: {"ms": s.median, "p10_ms": s.p10, "p90_ms": s.p90, "GBps": gbps(nbytes[name], s.median)}
                      for name, s in st.items()}
    row["spread_pct"] = max(100 * (s.p90 - s.p10) / s.median for s in st.values())
    ratios: dict[str, float | str] = {}
    if "triton" in st:
        # % of copy bandwidth = (triton bytes / copy bytes) x (copy time / triton time): the flag is the time ratio's
        vs_copy = _timing.ratio(st["copy"], st["triton"])
        ratios["triton_pct_of_copy"] = 100 * nbytes["triton"] / nbytes["copy"] * vs_copy.value
        ratios["triton_pct_of_copy_flag"] = vs_copy.flag
        for other in ("index_select", "reference", "triton_loop"):
            if other in st:
                r = _timing.ratio(st[other], st["triton"])
                ratios[f"speedup_vs_{other}"], ratios[f"speedup_vs_{other}_flag"] = r.value, r.flag
    row["ratios"] = ratios


COLUMNS = ["triton", "triton_loop", "reference", "index_select", "adv_index", "copy"]


def format_row(row: dict) -> str:
    if row["kind"] == "gather":
        shape = f"B={row['B']} N={row['N']} D={row['D']} K={row['K']}"
    else:
        shape = f"B={row['B']} {row['tensors']}x[{row['H']},{row['S']},{row['Dh']}] K={row['K']}"
    cells = []
    for col in COLUMNS:
        m = row["methods"].get(col)
        cells.append(f"{m['GBps']:8.1f}" if m else f"{'-':>8}")
    r = row["ratios"]
    pct = f"{r['triton_pct_of_copy']:.1f}%{r['triton_pct_of_copy_flag']}" if "triton_pct_of_copy" in r else "-"
    spd = (f"{r['speedup_vs_index_select']:.2f}x{r['speedup_vs_index_select_flag']}"
           if "speedup_vs_index_select" in r else "-")
    exact = {None: "-", True: "yes", False: "NO"}[row["exact"]]
    return (f"{row['kind']:6} {row['model']:14} {row['dtype']:5} {shape:36} " + " ".join(cells) +
            f" {row['spread_pct']:5.0f}% {pct:>8} {spd:>8} {exact}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one K per model, fewer repeats")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default evals/results/kernels_<device>.json)"
    )
    parser.add_argument("--dtypes", default=None, help="comma list of fp16,bf16,fp32 (default fp16,bf16; CPU: fp16)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1; see below)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype_names = (args.dtypes or ("fp16,bf16" if on_gpu else "fp16")).split(",")
    dtypes = [DTYPES[d.strip()] for d in dtype_names]
    interpreted_env = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")

    notes: list[str] = []
    tg = None
    if on_gpu or interpreted_env:
        import vtprune.kernels.triton_gather as tg

        if interpreted_env:
            notes.append("Triton runs under TRITON_INTERPRET=1 (interpreter): its timings are not performance")
    else:
        notes.append("CPU without TRITON_INTERPRET: Triton columns skipped (the kernel needs a GPU); torch paths only")
    if on_gpu:
        timer = Timer(device, warmup=5 if args.quick else 10, repeats=20 if args.quick else 50)
        kv_batches: tuple[int, ...] = (1, 8)
        timing = "CUDA events, L2 flushed before each call"
    else:
        timer = Timer(device, warmup=1, repeats=3 if args.quick else 5)
        kv_batches = (1,)
        timing = "time.perf_counter"
        notes.append(
            f"CPU: {args.threads} intra-op thread(s); KV cases at B=1 only; gathers include allocating the "
            "output (page faults on CPU), copy writes a preallocated buffer"
        )

    # One thread by default: on a small shared CPU box a multi-threaded op whose worker gets descheduled costs a
    # scheduler quantum (~8 ms), which swamps everything measured here (pinned on CUDA too, to report it).
    _timing.pin_threads(args.threads)
    torch.manual_seed(0)
    env = _timing.environment(device, ",".join(dtype_names))
    header = {
        **env,
        "device_slug": device_slug(device),
        "triton": triton_version(),
        "dtypes": dtype_names,
        "timing": f"{timing}; {_timing.method_line(timer.repeats, timer.warmup)}",
        "warmup": timer.warmup,
        "repeats": timer.repeats,
        "quick": args.quick,
        "gbps_definition": "(bytes read + bytes written) / time; reads = kept rows (+ index), writes = output",
        "notes": notes,
    }
    print("vtprune kernel benchmark")
    print(_timing.environment_line(env) + f" | triton {header['triton']}")
    print(f"{timing}; {_timing.method_line(timer.repeats, timer.warmup)}")
    for note in notes:
        print(f"  note    : {note}")
    print()
    title = f"{'kind':6} {'model':14} {'dtype':5} {'shape':36} " + " ".join(f"{c[:8]:>8}" for c in COLUMNS)
    print(title + f" {'spread':>6} {'tri/cpy':>8} {'vs_isel':>8} exact")
    print(f"{'':63}{'(GB/s)':^53}")

    rows = []
    for dtype_name, dtype in zip(dtype_names, dtypes):
        jobs = [(bench_gather, c) for c in gather_cases(args.quick)] + [
            (bench_kv, c) for c in kv_cases(args.quick, kv_batches)
        ]
        for bench, case in jobs:
            row = bench(case, dtype, device, timer, tg)
            row["dtype"] = dtype_name
            rows.append(row)
            print(format_row(row), flush=True)
            if on_gpu:
                torch.cuda.empty_cache()

    out = args.out or REPO / "evals" / "results" / f"kernels_{header['device_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": header, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    bad = [r for r in rows if r["exact"] is False]
    if bad:
        print(f"ERROR: Triton output differs from the reference in {len(bad)} case(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
