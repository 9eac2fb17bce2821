"""vtprune._timing: statistics, ratio flags and the interleaving order, driven by fake timers (no real timing)."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator

import pytest
import torch

from vtprune import _timing as T


def test_quantile_matches_inclusive_interpolation():
    xs = [7.0, 1.0, 3.0, 10.0, 4.0]
    # statistics' "inclusive" method is the same linear interpolation between order statistics
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    assert T.quantile(xs, 0.1) == pytest.approx(deciles[0]) == pytest.approx(1.8)
    assert T.quantile(xs, 0.9) == pytest.approx(deciles[-1]) == pytest.approx(8.8)
    assert T.quantile(xs, 0.5) == 4.0 == statistics.median(xs)
    assert T.quantile(xs, 0.0) == 1.0 and T.quantile(xs, 1.0) == 10.0
    assert T.quantile([5.0], 0.9) == 5.0
    with pytest.raises(ValueError, match="no values"):
        T.quantile([], 0.5)
    with pytest.raises(ValueError, match="not in"):
        T.quantile(xs, 1.5)


def test_stats_median_and_spread():
    s = T.Stats((10.0, 12.0, 11.0, 30.0, 9.0))  # one outlier from a load burst
    assert s.n == 5 and s.median == 11.0
    assert s.p10 == pytest.approx(9.4) and s.p90 == pytest.approx(22.8)
    assert s.spread() == "9.40-22.80"
    assert T.Stats((10.0, 12.0, 11.0)).spread() == "10.2-11.8"
    assert T.Stats((0.1, 0.12, 0.11)).spread() == "0.102-0.118"
    assert s.to_dict() == {"median_ms": 11.0, "p10_ms": pytest.approx(9.4), "p90_ms": pytest.approx(22.8),
                           "runs": 5}


def test_ratio_clear_difference_has_no_flag():
    slow = T.Stats((20.0, 21.0, 22.0, 23.0, 24.0))
    fast = T.Stats((10.0, 10.5, 11.0, 11.5, 12.0))
    r = T.ratio(slow, fast)
    assert r.value == pytest.approx(22.0 / 11.0)
    assert r.lo == pytest.approx(slow.p10 / fast.p90) and r.hi == pytest.approx(slow.p90 / fast.p10)
    assert r.flag == "" and str(r) == "2.00x"
    # the other direction: the same evidence, inverted
    assert T.ratio(fast, slow).flag == "" and T.ratio(fast, slow).value == pytest.approx(0.5)


def test_ratio_overlapping_intervals_are_flagged_even_if_medians_differ():
    # medians 12 vs 10 (1.2x) but each variant's p10-p90 interval covers the other's median: direction unsupported
    a = T.Stats((8.0, 11.0, 12.0, 13.0, 20.0))
    b = T.Stats((7.0, 9.0, 10.0, 11.0, 18.0))
    r = T.ratio(a, b)
    assert r.value == pytest.approx(1.2)
    assert r.lo < 1.0 < r.hi
    assert r.flag == "~" and str(r) == "1.20x~"
    assert T.ratio(b, a).flag == "~"


def test_ratio_wide_range_is_flagged_as_size_unsupported():
    # intervals do not overlap (b is faster for sure), but the spread leaves its size anywhere from ~1.1x to ~4x
    a = T.Stats((20.0, 22.0, 30.0, 40.0, 60.0))
    b = T.Stats((5.0, 6.0, 10.0, 14.0, 15.0))
    r = T.ratio(a, b)
    assert r.lo > 1.0 and r.hi / r.lo > T.MAX_RANGE
    assert r.flag == "?"


def test_ratio_too_few_runs_is_flagged():
    r = T.ratio(T.Stats((20.0, 21.0)), T.Stats((10.0, 10.0)))
    assert r.lo > 1.0 and r.hi / r.lo < T.MAX_RANGE  # clean by the other rules
    assert r.flag == "?"
    assert T.ratio(T.Stats((20.0, 21.0, 22.0)), T.Stats((10.0, 10.0, 10.0))).flag == ""


class FakeClock:
    """A timer that records which case ran when and returns scripted durations per case."""

    def __init__(self, durations: dict[str, Iterator[float]]):
        self.durations = durations
        self.log: list[str] = []
        self.current: str | None = None

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        self.log.append(f"timed:{self.current}")
        return next(self.durations[self.current])


def test_measure_interleaves_warmup_then_rounds_with_context_outside_the_timing():
    events: list[str] = []
    clock = FakeClock({"A": iter([3.0, 1.0, 2.0]), "B": iter([5.0, 6.0, 4.0]), "C": iter([9.0, 8.0, 7.0])})

    def make(name: str) -> T.Case:
        def fn() -> None:
            clock.current = name
            events.append(f"call:{name}")

        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            events.append(f"enter:{name}")
            yield
            events.append(f"exit:{name}")

        return T.Case(fn, ctx)

    res = T.measure({n: make(n) for n in "ABC"}, repeats=3, warmup=2, timer=clock)
    one_round = [e for n in "ABC" for e in (f"enter:{n}", f"call:{n}", f"exit:{n}")]
    assert events == one_round * (2 + 3)  # 2 warm-up rounds, 3 timed rounds, A B C each time
    assert clock.log == ["timed:A", "timed:B", "timed:C"] * 3  # warm-up calls are not timed
    assert list(res) == ["A", "B", "C"]
    assert res["A"].times_ms == (3.0, 1.0, 2.0) and res["A"].median == 2.0
    assert res["B"].median == 5.0 and res["C"].median == 8.0


def test_measure_accepts_plain_callables_and_rejects_bad_counts():
    calls: list[str] = []
    res = T.measure({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=2, warmup=1,
                    timer=lambda fn: (fn(), 1.5)[1])
    assert calls == ["x", "y"] * 3
    assert res["x"].times_ms == (1.5, 1.5)
    with pytest.raises(ValueError, match="repeats=0"):
        T.measure({"x": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        T.measure({"x": lambda: None}, repeats=1, warmup=-1)
    with pytest.raises(ValueError, match="no cases"):
        T.measure({}, repeats=1)


def test_wall_timer_returns_milliseconds(monkeypatch):
    ticks = iter([100.0, 100.025])  # perf_counter seconds: 25 ms apart
    monkeypatch.setattr("time.perf_counter", lambda: next(ticks))
    ran: list[int] = []
    assert T.wall_timer(lambda: ran.append(1)) == pytest.approx(25.0)
    assert ran == [1]
    assert T.default_timer("cpu") is T.wall_timer and T.default_timer(None) is T.wall_timer


def test_pin_threads_and_environment_report_them():
    before = torch.get_num_threads()
    try:
        assert T.pin_threads(1) == 1
        env = T.environment("cpu", torch.float16)
        assert env["threads"] == "1" and env["dtype"] == "float16" and env["torch"] == torch.__version__
        assert env["device"].startswith("CPU ") and float(env["load avg 1 min"]) >= 0
        line = T.environment_line(env)
        assert line.startswith("device: CPU ") and "threads 1" in line and "transformers " in line
        with pytest.raises(ValueError, match="threads=0"):
            T.pin_threads(0)
    finally:
        torch.set_num_threads(before)
    with T.pinned_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    assert "p10" in T.method_line(5, 1) and "'~'" in T.method_line(5, 1)


def test_pruned_case_context_prunes_inside_and_unprunes_after_even_on_error():
    import vtprune
    from vtprune.testing import tiny_llava

    model, _ = tiny_llava("llava")
    with T.pruned(model, method="random", keep=4) as m:
        assert m is model and vtprune.is_pruned(model)
    assert not vtprune.is_pruned(model)
    with pytest.raises(RuntimeError, match="boom"), T.pruned(model, method="random", keep=4):
        raise RuntimeError("boom")
    assert not vtprune.is_pruned(model)
    # used as a Case context: pruned around every call, warm-up and timed
    seen: list[bool] = []
    T.measure({"p": T.Case(lambda: seen.append(vtprune.is_pruned(model)),
                           lambda: T.pruned(model, method="random", keep=4))},
              repeats=2, warmup=1, timer=lambda fn: (fn(), 1.0)[1])
    assert seen == [True, True, True] and not vtprune.is_pruned(model)
