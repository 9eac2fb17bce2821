"""evals/bench_policy.py on its tiny shapes (``--quick``): every method x budget of both policies is in the results with
its numbers, speed-ups, prefix-cache bytes and extrapolations, the oracle comparison and the extrapolation check.
Timings are only checked to be there: their values belong to the benchmark, not to a test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
import bench_policy as bench  # noqa: E402


def _check_measured(p: dict, unpruned: dict) -> None:
    t = p["timing"]
    assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"] and t["runs"] == 2
    x = p["extrapolated_real_depth"]
    assert x["label"].startswith("EXTRAPOLATED") and x["timing"]["median_ms"] > t["median_ms"]
    assert x["kv_cache_bytes"] > p["kv_cache_bytes"] > 0
    if p["method"] != "none":
        for sp in (p["speedup"], x["speedup"]):
            assert sp["ratio"] > 0 and sp["lo"] <= sp["hi"] and sp["flag"] in ("", "~", "?")
        assert p["selector_ms"] >= 0 and p["selector_share_of_unpruned_step"] == pytest.approx(
            p["selector_ms"] / unpruned["timing"]["median_ms"])


def test_quick_run_has_every_method_and_budget(tmp_path, capsys):
    out = tmp_path / "policy.json"
    res = bench.main(["--quick", "--repeats", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["pi0"]["points"] == json.loads(json.dumps(res["pi0"]["points"]))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    env = saved["env"]
    assert {"device", "torch", "transformers", "dtype", "threads"} <= set(env) and env["threads"] == "1"

    pi0 = saved["pi0"]
    cams, per_cam = pi0["config"]["cameras"], pi0["config"]["tokens_per_camera"]
    pts = {(p["method"], p["budget"]): p for p in pi0["points"] if p["status"] != "oracle"}
    assert set(pts) == {("none", None)} | {(m, b) for m in bench.PRE_LLM + bench.IN_LLM for b in bench.BUDGETS}
    unpruned = pts[("none", None)]
    _check_measured(unpruned, unpruned)
    for method in bench.PRE_LLM:
        for b in bench.BUDGETS:
            p = pts[(method, b)]
            _check_measured(p, unpruned)
            assert p["visual_tokens_after"] == cams * bench.keep_of(b, per_cam)
            assert p["kv_cache_bytes"] < unpruned["kv_cache_bytes"]  # the prefix cache holds the kept tokens only
        orc = pts[(method, bench.GOAL_BUDGET)]["vs_oracle"]
        assert orc["ratio"] > 0 and "share_of_unpruned_step" in orc
    for method in bench.IN_LLM:  # pruned inside the prefix pass from layer 1: the cache of layers >= 1 is smaller
        for b in bench.BUDGETS:
            p = pts[(method, b)]
            _check_measured(p, unpruned)
            assert p["visual_tokens_after"] == cams * bench.keep_of(b, per_cam)
            assert p["kv_cache_bytes_per_layer"][0] == unpruned["kv_cache_bytes_per_layer"][0]
            assert p["kv_cache_bytes_per_layer"][-1] < unpruned["kv_cache_bytes_per_layer"][-1]
    check = pi0["extrapolation_check"]
    assert [(c["method"], c["budget"]) for c in check["points"]] == [("none", None), ("divprune", bench.GOAL_BUDGET)]
    assert all(abs(c["error"]) < 1 for c in check["points"])  # a prediction, not a broken sum
    assert len(pi0["goal_verdict"]) == len(bench.PRE_LLM + bench.IN_LLM)

    act = saved["action_tokens"]
    pts = {(p["method"], p["budget"]): p for p in act["points"]}
    assert set(pts) == {("none", None)} | {(m, b) for m in bench.IN_LLM for b in bench.BUDGETS}
    for p in pts.values():
        _check_measured(p, pts[("none", None)])
    for b in bench.BUDGETS:  # vla_pruner's timed steps came after its warm-up: they pruned to the budget
        assert pts[("vla_pruner", b)]["visual_tokens_after"] == bench.keep_of(b, act["config"]["visual_tokens"])
    printed = capsys.readouterr().out
    assert "extrapolated" in printed and env["device"] in printed
