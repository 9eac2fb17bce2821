"""Side-by-side timing for ``vtprune demo`` and the ``evals/bench_*.py`` scripts (one implementation for all).

Why this exists: on a shared, loaded machine the same forward took 25 ms in one run and 205 ms in the next, and
ratios of two medians measured minutes apart swung from 0.04x to 9.9x. The rules here make such numbers
comparable, and say so when they are not:

* **Interleaved repeats.** Every variant runs once per round, in a fixed order (A, B, C, A, B, C, ...), so a load
  burst or a frequency change hits all variants alike instead of whichever happened to be measured then.
* **Warm-up** rounds (same interleaved order) before the timed ones: first-call allocation, lazy init, caches.
* **Threads pinned** with :func:`pin_threads` and reported by :func:`environment`. A multi-threaded op whose
  worker thread is descheduled by someone else's job waits a whole scheduler quantum, so on a small shared CPU
  one intra-op thread gives the steadiest numbers; the scripts default to 1 and take ``--threads``.
* **Median with p10-p90** of each variant (:class:`Stats`), never a mean or a single run.
* **Ratios from medians of one interleaved run** (:func:`ratio`), with a flag when the spread does not support
  them. The rule (:data:`FLAG_RULE`): with ``r = median(a) / median(b)``, its range is
  ``[p10(a) / p90(b), p90(a) / p10(b)]`` (the extreme ratios of the two middle-80 % intervals).

  - ``~`` when the range contains 1, i.e. the two p10-p90 intervals overlap: the runs do not establish which
    variant is faster, so neither the direction nor the size of ``r`` is supported;
  - ``?`` when either variant has fewer than :data:`MIN_RUNS` timed runs (no spread to judge), or the range is
    wider than a factor :data:`MAX_RANGE` (``hi / lo``): the direction holds but the size is not pinned down;
  - no flag otherwise.

On CUDA each call is timed with CUDA events after a device synchronise (so queued work of the previous call or
of an untimed set-up does not leak in) and read after the end event completes; on CPU with ``time.perf_counter``.
Timings belong in benchmarks, never in test assertions: the unit tests drive this module with fake timers.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: fewer timed runs than this per variant: no p10-p90 spread worth the name, every ratio gets ``?``
MIN_RUNS = 3
#: a ratio whose p10/p90-derived range spans more than this factor (hi / lo) gets ``?``
MAX_RANGE = 2.0
FLAG_RULE = (f"ratio flags: '~' = the two p10-p90 intervals overlap (which is faster is not established); "
             f"'?' = fewer than {MIN_RUNS} runs, or the ratio's range [p10(a)/p90(b), p90(a)/p10(b)] spans more "
             f"than {MAX_RANGE:g}x (size not established)")

Timer = Callable[[Callable[[], object]], float]  # runs fn once, returns milliseconds


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``xs`` (0 <= q <= 1), linear interpolation between order statistics (numpy's default,
    ``statistics.quantiles(method="inclusive")``), so p10/p90 of few runs stay inside the observed range."""
    if not xs:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q!r} is not in [0, 1]")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Timed runs of one variant, in milliseconds, in the order they ran."""

    times_ms: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return quantile(self.times_ms, 0.5)

    @property
    def p10(self) -> float:
        return quantile(self.times_ms, 0.1)

    @property
    def p90(self) -> float:
        return quantile(self.times_ms, 0.9)

    def spread(self) -> str:
        """``"p10-p90"`` in ms for tables, with enough decimals that a sub-millisecond spread stays readable."""
        digits = 1 if self.p10 >= 10 else 2 if self.p10 >= 1 else 3
        return f"{self.p10:.{digits}f}-{self.p90:.{digits}f}"

    def to_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median, "p10_ms": self.p10, "p90_ms": self.p90, "runs": self.n}


@dataclass(frozen=True)
class Ratio:
    """``median(a) / median(b)`` of two variants timed side by side, its p10/p90 range and its flag."""

    value: float
    lo: float
    hi: float
    flag: str  # "", "~" or "?" (see FLAG_RULE)

    def __str__(self) -> str:
        return f"{self.value:.2f}x{self.flag}"

    def to_dict(self) -> dict[str, float | str]:
        return {"ratio": self.value, "lo": self.lo, "hi": self.hi, "flag": self.flag}


def ratio(a: Stats, b: Stats) -> Ratio:
    """How many times ``a``'s median exceeds ``b``'s: a speed-up of ``b`` over ``a`` is ``ratio(a, b)``.

    ``a`` and ``b`` must come from one :func:`measure` call (interleaved, same process); the flag follows
    :data:`FLAG_RULE`.
    """
    value = a.median / b.median
    lo, hi = a.p10 / b.p90, a.p90 / b.p10
    if lo <= 1.0 <= hi:
        flag = "~"
    elif min(a.n, b.n) < MIN_RUNS or hi / lo > MAX_RANGE:
        flag = "?"
    else:
        flag = ""
    return Ratio(value, lo, hi, flag)


@dataclass(frozen=True)
class Case:
    """One variant: ``fn`` is timed; ``context()`` is entered around every call (warm-up and timed) but outside
    the timed region, for per-variant set-up such as ``vtprune.prune`` / ``unprune`` or an L2 flush."""

    fn: Callable[[], object]
    context: Callable[[], AbstractContextManager[object]] = field(default=contextlib.nullcontext)


@contextlib.contextmanager
def pruned(model: torch.nn.Module, **prune_kwargs: object) -> Iterator[torch.nn.Module]:
    """``model`` pruned by ``vtprune.prune(model, **prune_kwargs)`` inside the block and unpruned after (also on
    error): the per-call context of a pruned :class:`Case`, so that the interleaved rounds can alternate pruned and
    unpruned variants of one model without timing ``prune`` / ``unprune`` themselves."""
    from .api import prune, unprune

    prune(model, **prune_kwargs)
    try:
        yield model
    finally:
        unprune(model)


def wall_timer(fn: Callable[[], object]) -> float:
    """Milliseconds of one call by the wall clock (CPU work)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cuda_timer(device: torch.device | str | int | None = None) -> Timer:
    """A timer for work queued on ``device``'s current stream: synchronise first (earlier work and untimed
    set-up must not count), bracket the call with CUDA events, wait for the end event, read the elapsed time.
    Host-side gaps inside ``fn`` count too, since the GPU timestamps the end event only after they are queued."""

    def timed(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return timed


def default_timer(device: torch.device | str | None = None) -> Timer:
    """:func:`cuda_timer` for a CUDA device, :func:`wall_timer` otherwise."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return cuda_timer(dev) if dev.type == "cuda" else wall_timer


def measure(cases: Mapping[str, Case | Callable[[], object]], repeats: int, warmup: int = 1,
            device: torch.device | str | None = None, timer: Timer | None = None) -> dict[str, Stats]:
    """Time every case ``repeats`` times, interleaved: ``warmup`` untimed rounds, then ``repeats`` timed rounds,
    each round running every case once in the mapping's order. Returns ``{name: Stats}`` in that order.

    ``timer`` (default: :func:`default_timer` of ``device``) times one call; tests pass a fake one.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}; need at least 1 timed run per case")
    if warmup < 0:
        raise ValueError(f"warmup={warmup!r}; need 0 or more warm-up rounds")
    if not cases:
        raise ValueError("no cases to time")
    timer = timer or default_timer(device)
    norm = {name: c if isinstance(c, Case) else Case(c) for name, c in cases.items()}
    for _ in range(warmup):
        for c in norm.values():
            with c.context():
                c.fn()
    times: dict[str, list[float]] = {name: [] for name in norm}
    for _ in range(repeats):
        for name, c in norm.items():
            with c.context():
                times[name].append(timer(c.fn))
    return {name: Stats(tuple(t)) for name, t in times.items()}


def pin_threads(n: int) -> int:
    """Fix torch's intra-op thread count to ``n`` (>= 1) and return the count now in force (to report it)."""
    if n < 1:
        raise ValueError(f"threads={n!r}; need at least 1")
    torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[int]:
    """:func:`pin_threads` for the block only (the previous count comes back after), for callers inside a longer
    process such as the test-suite."""
    before = torch.get_num_threads()
    try:
        yield pin_threads(n)
    finally:
        torch.set_num_threads(before)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None, dtype: torch.dtype | str = torch.float32) -> dict[str, str]:
    """What a timing depends on, to print beside it: device, python/torch/transformers versions, dtype, threads
    and (where the OS reports it) the 1-minute load average when it is called."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU {_cpu_name()} ({os.cpu_count()} logical CPUs)"
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # kernel benchmarks need no transformers
        tf = "not installed"
    env = {"device": name, "python": platform.python_version(), "torch": torch.__version__, "transformers": tf,
           "dtype": str(dtype).removeprefix("torch."), "threads": str(torch.get_num_threads())}
    if hasattr(os, "getloadavg"):  # other jobs on the machine: what the spread flags are about
        env["load avg 1 min"] = f"{os.getloadavg()[0]:.1f}"
    return env


def environment_line(env: Mapping[str, str]) -> str:
    """One line ``device: ... | torch ... | ...`` for the top of a result table."""
    return f"device: {env['device']} | " + " | ".join(f"{k} {v}" for k, v in env.items() if k != "device")


def method_line(repeats: int, warmup: int) -> str:
    """How the numbers below were taken, and the flag rule."""
    return (f"timing: {repeats} interleaved runs per variant after {warmup} warm-up round(s); median [p10-p90] ms; "
            f"ratios of medians from the same run\n{FLAG_RULE}")
