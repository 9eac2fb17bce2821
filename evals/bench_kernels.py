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

On CUDA: CUDA events around each call, L2 flushed (256 MiB write) before every timed call so that numbers are DRAM
bandwidth, warmup, median of the repeats. On CPU: ``time.perf_counter``, small repeat counts, and the Triton columns
are skipped unless ``TRITON_INTERPRET=1`` (the interpreter: correctness only, its timings mean nothing); KV cases
use B=1 only on CPU to stay under a minute.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn()``."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            for _ in range(self.repeats):
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} thread(s))"


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
    res = {name: timer(fn) for name, fn in fns.items()}
    copy_bytes = 2 * out_elems * x.element_size()

    exact = None
    if tg is not None:
        exact = torch.equal(tg.gather_tokens(x, index), reference.gather_tokens(x, index))
    methods = {name: {"ms": ms, "GBps": gbps(copy_bytes if name == "copy" else nbytes, ms)} for name, ms in res.items()}
    return {"kind": "gather", **vars(case), "bytes": nbytes, "methods": methods, "exact": exact}


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
    res = {name: timer(fn) for name, fn in fns.items()}

    exact = None
    if tg is not None:
        exact = torch.equal(tg.compact_kv_stacked(caches, index), reference.compact_kv_stacked(caches, index))
    methods = {
        name: {"ms": ms, "GBps": gbps(2 * out_elems * elem if name == "copy" else nbytes, ms)}
        for name, ms in res.items()
    }
    return {"kind": "kv", **vars(case), "tensors": n_tensors, "bytes": nbytes, "methods": methods, "exact": exact}


def add_ratios(row: dict) -> None:
    m = row["methods"]
    ratios = {}
    if "triton" in m:
        ratios["triton_pct_of_copy"] = 100 * m["triton"]["GBps"] / m["copy"]["GBps"]
        if "index_select" in m:
            ratios["speedup_vs_index_select"] = m["index_select"]["ms"] / m["triton"]["ms"]
        ratios["speedup_vs_reference"] = m["reference"]["ms"] / m["triton"]["ms"]
        if "triton_loop" in m:
            ratios["speedup_vs_triton_loop"] = m["triton_loop"]["ms"] / m["triton"]["ms"]
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
    pct = f"{r['triton_pct_of_copy']:6.1f}%" if "triton_pct_of_copy" in r else f"{'-':>7}"
    spd = f"{r['speedup_vs_index_select']:6.2f}x" if "speedup_vs_index_select" in r else f"{'-':>7}"
    exact = {None: "-", True: "yes", False: "NO"}[row["exact"]]
    return f"{row['kind']:6} {row['model']:14} {row['dtype']:5} {shape:36} " + " ".join(cells) + f" {pct} {spd} {exact}"


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
        timing = "CUDA events, L2 flushed before each call, median"
    else:
        timer = Timer(device, warmup=1, repeats=3 if args.quick else 5)
        kv_batches = (1,)
        timing = "time.perf_counter, median"
        # One thread by default: on a small shared CPU box a multi-threaded op whose worker gets descheduled costs a
        # scheduler quantum (~8 ms), which swamps everything measured here.
        torch.set_num_threads(args.threads)
        notes.append(
            f"CPU: {args.threads} intra-op thread(s); KV cases at B=1 only; gathers include allocating the "
            "output (page faults on CPU), copy writes a preallocated buffer"
        )

    torch.manual_seed(0)
    header = {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "dtypes": dtype_names,
        "timing": timing,
        "warmup": timer.warmup,
        "repeats": timer.repeats,
        "quick": args.quick,
        "gbps_definition": "(bytes read + bytes written) / time; reads = kept rows (+ index), writes = output",
        "notes": notes,
    }
    print("vtprune kernel benchmark")
    for key in ("device", "torch", "triton", "python", "dtypes", "timing", "repeats"):
        print(f"  {key:8}: {header[key]}")
    for note in notes:
        print(f"  note    : {note}")
    print()
    title = f"{'kind':6} {'model':14} {'dtype':5} {'shape':36} " + " ".join(f"{c[:8]:>8}" for c in COLUMNS)
    print(title + f" {'tri/cpy':>7} {'vs_isel':>7} exact")
    print(f"{'':63}{'(GB/s)':^53}")

    rows = []
    for dtype_name, dtype in zip(dtype_names, dtypes):
        jobs = [(bench_gather, c) for c in gather_cases(args.quick)] + [
            (bench_kv, c) for c in kv_cases(args.quick, kv_batches)
        ]
        for bench, case in jobs:
            row = bench(case, dtype, device, timer, tg)
            row["dtype"] = dtype_name
            add_ratios(row)
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
