"""VLA-Pruner selector (SELECTORS.md §6.8): the selector-level invariants, the temporal estimate, the report counts and
the option checks. CPU, seeded, no model."""

from __future__ import annotations

import collections
import math
import random

import pytest
import torch

import vtprune
from vtprune.registry import get_selector
from vtprune.selectors.vla_pruner import SPEC, criterion_counts, temporal_estimate, vla_pruner_select

# ----------------------------------------------------------------------------------------------------------- helpers


def top_set(score: torch.Tensor, keep: int) -> set[int]:
    """Test-side top-``keep`` of one row of distinct scores (no ties in the random cases)."""
    return set(torch.argsort(score.double(), descending=True)[:keep].tolist())


def maxmin_loop(x: torch.Tensor, keep: int) -> list[int]:
    """Plain greedy max-min on rows ``x[M, D]`` in float64: the most isolated row first (largest nearest-neighbour
    cosine distance), then each row farthest from the picked ones; strict ``>`` so ties go to the lower position.
    Returns positions into ``x``."""
    x = x.double()
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = 1 - xn @ xn.T
    m = x.shape[0]
    nn = [min((d[i, j].item() for i in range(m) if i != j), default=math.inf) for j in range(m)]
    picks = [max(range(m), key=lambda j: (nn[j], -j))]
    while len(picks) < keep:
        best, best_score = -1, -math.inf
        for j in range(m):
            if j in picks:
                continue
            s = min(d[p, j].item() for p in picks)
            if s > best_score:
                best, best_score = j, s
        picks.append(best)
    return picks


def expected(features: torch.Tensor, prefill: torch.Tensor, action: torch.Tensor, keep: int) -> list[int]:
    """§6.8 steps 4-5 for one row, written out: union of the two top-``keep`` sets, filtered by the loop above."""
    union = sorted(top_set(prefill, keep) | top_set(action, keep))
    if len(union) == keep:
        return union
    return sorted(union[p] for p in maxmin_loop(features[union], keep))


def random_case(gen: torch.Generator, rng: random.Random, b: int | None = None):
    b = b or rng.randint(1, 4)
    n = rng.randint(2, 40)
    keep = rng.randint(1, n)
    feats = torch.randn(b, n, rng.randint(2, 16), generator=gen)
    prefill = torch.rand(b, n, generator=gen).softmax(-1)
    action = torch.rand(b, n, generator=gen).softmax(-1)
    return feats, prefill, action, keep


# --------------------------------------------------------------------------------------------- selector invariants


def test_spec_and_registration():
    spec = get_selector("vla_pruner")
    assert spec is SPEC and spec.fn is vla_pruner_select
    assert spec.requires == ("prefill_attention", "action_attention")
    assert spec.stages == ("llm",) and spec.text_guided and spec.default_layer == 3
    assert spec.options == {"window": 3, "gamma": 0.8, "weighting": "paper", "record_layer": None}
    assert "2511.16449" in spec.description
    assert "vla_pruner" in vtprune.list_methods()


def test_output_is_in_the_union_with_exactly_keep_and_matches_the_spec():
    """Output ⊆ C_vl ∪ C_act, |output| = keep, ascending unique, and equal to the union filtered by a plain loop."""
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    filtered = 0
    for _ in range(40):
        feats, prefill, action, keep = random_case(gen, rng)
        out = vla_pruner_select(feats, keep, prefill_attention=prefill, action_attention=action)
        assert out.dtype == torch.long and out.shape == (feats.shape[0], keep)
        for r in range(feats.shape[0]):
            row = out[r].tolist()
            assert row == sorted(set(row)) and len(row) == keep
            union = top_set(prefill[r], keep) | top_set(action[r], keep)
            assert set(row) <= union
            assert row == expected(feats[r], prefill[r], action[r], keep)
            filtered += len(union) > keep
    assert filtered > 20  # the diversity filter really ran in most rows


def test_agreeing_criteria_keep_c_vl():
    """C_vl = C_act ⇒ output = C_vl, whatever the features (also when the two scores differ inside the set)."""
    gen = torch.Generator().manual_seed(1)
    b, n, keep = 3, 24, 7
    feats = torch.randn(b, n, 8, generator=gen)
    prefill = torch.rand(b, n, generator=gen)
    c_vl = torch.sort(prefill, dim=-1, descending=True).indices[:, :keep].sort(-1).values
    # the same top set in another order: reverse the scores inside it
    action = prefill.clone()
    action.scatter_(1, c_vl, prefill.gather(1, c_vl).flip(-1))
    for act in (prefill, action):
        out = vla_pruner_select(feats, keep, prefill_attention=prefill, action_attention=act)
        assert torch.equal(out, c_vl)
        assert criterion_counts(out, prefill, act, keep).tolist() == [[0, 0, keep]] * b


def test_diversity_runs_on_the_union_only():
    """The most isolated token is chosen among U's members, with U's members as its only neighbours.

    Unit vectors at angles 0°, 10°, 90°, 180° (tokens 0-3, the union) and 175° (token 4, in neither criterion).
    Inside U, token 3 is the most isolated (90° to token 2), then token 0 is farthest from it: {0, 3}. Had token 4
    counted as a neighbour, token 3 would look crowded (5°) and the answer would be {0, 2}.
    """
    deg = torch.tensor([0.0, 10.0, 90.0, 180.0, 175.0]) * math.pi / 180
    feats = torch.stack([deg.cos(), deg.sin()], dim=-1)[None]  # [1, 5, 2]
    prefill = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1]])  # C_vl = {0, 1}
    action = torch.tensor([[0.1, 0.1, 0.3, 0.4, 0.1]])  # C_act = {2, 3}
    out = vla_pruner_select(feats, 2, prefill_attention=prefill, action_attention=action)
    assert out.tolist() == [[0, 3]]
    assert maxmin_loop(feats[0], 2) != [3, 0]  # the unrestricted greedy differs: the restriction matters
    assert criterion_counts(out, prefill, action, 2).tolist() == [[1, 1, 0]]


def test_features_are_what_the_filter_reads():
    """Same signals, other features ⇒ the filter picks differently (it reads the given embeddings and nothing else)."""
    gen = torch.Generator().manual_seed(2)
    n, keep = 32, 6
    prefill, action = torch.rand(1, n, generator=gen), torch.rand(1, n, generator=gen)
    outs = set()
    for _ in range(5):
        feats = torch.randn(1, n, 8, generator=gen)
        out = vla_pruner_select(feats, keep, prefill_attention=prefill, action_attention=action)
        assert out[0].tolist() == expected(feats[0], prefill[0], action[0], keep)
        outs.add(tuple(out[0].tolist()))
    assert len(outs) > 1


def test_batch_rows_are_independent():
    """B rows with unions of different sizes == each row alone."""
    gen, rng = torch.Generator().manual_seed(3), random.Random(3)
    sizes = set()
    for _ in range(20):
        feats, prefill, action, keep = random_case(gen, rng, b=4)
        out = vla_pruner_select(feats, keep, prefill_attention=prefill, action_attention=action)
        for r in range(4):
            alone = vla_pruner_select(feats[r : r + 1], keep, prefill_attention=prefill[r : r + 1],
                                      action_attention=action[r : r + 1])
            assert torch.equal(alone[0], out[r])
        sizes.add(tuple(len(top_set(prefill[r], keep) | top_set(action[r], keep)) for r in range(4)))
    assert any(len(set(s)) > 1 for s in sizes)  # some batches mixed union sizes


def test_invalid_tokens_never_chosen_and_are_as_if_absent():
    """valid_mask False tokens score highest in both criteria and are still never chosen; the result equals the
    selection on the valid tokens alone (they are neither candidates nor neighbours)."""
    gen, rng = torch.Generator().manual_seed(4), random.Random(4)
    for _ in range(30):
        feats, prefill, action, _ = random_case(gen, rng, b=2)
        n = feats.shape[1]
        valid = torch.rand(2, n, generator=gen) < 0.6
        valid[:, 0] = True
        keep = rng.randint(1, int(valid.sum(1).min()))
        out = vla_pruner_select(feats, keep, valid_mask=valid, prefill_attention=prefill.masked_fill(~valid, 9.0),
                                action_attention=action.masked_fill(~valid, 9.0))
        for r in range(2):
            idx = valid[r].nonzero().flatten()
            assert bool(valid[r, out[r]].all())
            alone = vla_pruner_select(feats[r : r + 1, idx], keep, prefill_attention=prefill[r : r + 1, idx],
                                      action_attention=action[r : r + 1, idx])
            assert out[r].tolist() == idx[alone[0]].tolist()


def test_keep_all_and_errors():
    f, a = torch.randn(2, 6, 4), torch.rand(2, 6)
    assert vla_pruner_select(f, 6, prefill_attention=a, action_attention=a).tolist() == [list(range(6))] * 2
    with pytest.raises(ValueError, match="vla_pruner requires the signal 'action_attention'"):
        vla_pruner_select(f, 3, prefill_attention=a)
    with pytest.raises(ValueError, match="vla_pruner requires the signal 'prefill_attention'"):
        vtprune.select_tokens("vla_pruner", f, 3, action_attention=a)
    with pytest.raises(ValueError, match=r"signal 'prefill_attention' must have shape \(2, 6\)"):
        vla_pruner_select(f, 3, prefill_attention=a[:, :5], action_attention=a)
    with pytest.raises(ValueError, match=r"keep must be in \[1, N=6\]"):
        vla_pruner_select(f, 7, prefill_attention=a, action_attention=a)
    with pytest.raises(ValueError, match="vla_pruner: option gamma must be"):
        vla_pruner_select(f, 3, prefill_attention=a, action_attention=a, gamma=0)


def test_grad_tracking_inputs_are_accepted():
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 20, 8, generator=gen)
    prefill, action = torch.rand(2, 20, generator=gen), torch.rand(2, 20, generator=gen)
    ref = vla_pruner_select(feats, 5, prefill_attention=prefill, action_attention=action)
    f, p, a = (t.clone().requires_grad_(True) for t in (feats, prefill, action))
    out = vla_pruner_select(f, 5, prefill_attention=p, action_attention=a)
    assert torch.equal(out, ref) and not out.requires_grad
    assert torch.equal(vtprune.select_tokens("vla_pruner", f, 5, prefill_attention=p, action_attention=a), ref)
    hist = [torch.rand(2, 20, generator=gen).requires_grad_(True) for _ in range(3)]
    est = temporal_estimate(hist, 0.8)
    assert not est.requires_grad
    assert torch.equal(est, temporal_estimate([h.detach() for h in hist], 0.8))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_scores_and_features_keep_the_contract(value):
    """NaN / -inf scores rank after every finite one (+inf first); a union member with a non-finite feature row is
    picked only after every finite member."""
    gen = torch.Generator().manual_seed(6)
    n, keep = 16, 4
    feats = torch.randn(1, n, 8, generator=gen)
    prefill = torch.rand(1, n, generator=gen)
    action = torch.rand(1, n, generator=gen)
    top_vl = sorted(top_set(prefill[0], keep))
    p = prefill.clone()
    p[0, top_vl[0]] = value  # the best-scored token of C_vl loses (NaN, -inf) or keeps (+inf) its place
    out = vla_pruner_select(feats, keep, prefill_attention=p, action_attention=action)
    # +inf ranks first (stays in C_vl); NaN and -inf rank after every finite score (leave C_vl)
    c_vl = top_set(prefill[0].masked_fill(torch.arange(n) == top_vl[0], 2.0 if value > 0 else -1.0), keep)
    assert set(out[0].tolist()) <= c_vl | top_set(action[0], keep) and out.shape == (1, keep)
    # non-finite feature row of a union member: the filter picks the finite members as if it were absent
    union = sorted(top_set(prefill[0], keep) | top_set(action[0], keep))
    assert len(union) > keep + 1
    bad = union[1]
    f = feats.clone()
    f[0, bad, 3] = value
    out = vla_pruner_select(f, keep, prefill_attention=prefill, action_attention=action)
    rest = [u for u in union if u != bad]
    assert out[0].tolist() == sorted(rest[q] for q in maxmin_loop(feats[0, rest], keep))
    # all-NaN signals: still exactly keep unique tokens
    nan = torch.full((1, n), float("nan"))
    out = vla_pruner_select(f, keep, prefill_attention=nan, action_attention=nan)
    assert out.tolist() == [list(range(keep))]


# ------------------------------------------------------------------------------------------------ temporal estimate


def test_temporal_estimate_is_the_decayed_normalised_sum():
    """Paper weighting: γ^i for the vector i steps back (i = 1 the latest), then unit sum per row: a positive
    combination of the recorded vectors."""
    gen = torch.Generator().manual_seed(7)
    hist = [torch.rand(2, 10, generator=gen) for _ in range(4)]  # oldest first
    g = 0.5
    est = temporal_estimate(hist, g)
    raw = sum(g ** (len(hist) - j) * h.double() for j, h in enumerate(hist))  # j = 0 oldest: i = w - j
    assert torch.allclose(est.double(), raw / raw.sum(-1, keepdim=True), atol=1e-6)
    assert est.dtype == torch.float32 and bool((est > 0).all())
    assert torch.allclose(est.sum(-1), torch.ones(2))
    # window: only the last w vectors count; a deque (the natural buffer) and a tuple work the same
    last3 = temporal_estimate(hist[-3:], g)
    assert torch.equal(temporal_estimate(hist, g, window=3), last3)
    assert torch.equal(temporal_estimate(collections.deque(hist[-3:], maxlen=3), g), last3)
    assert torch.equal(temporal_estimate(tuple(hist[-3:]), g), last3)
    # γ = 1: the plain average, either weighting
    mean = torch.stack(hist).sum(0)
    for weighting in ("paper", "code"):
        assert torch.allclose(temporal_estimate(hist, 1.0, weighting), mean / mean.sum(-1, keepdim=True))


@pytest.mark.parametrize("gamma", [1e-6, 1e-30, 1e-300])
def test_gamma_to_zero_gives_the_previous_step(gamma):
    """γ → 0 with paper weighting ⇒ the most recent vector (normalised); with code weighting ⇒ the oldest."""
    gen = torch.Generator().manual_seed(8)
    hist = [torch.rand(3, 12, generator=gen) for _ in range(3)]
    latest, oldest = hist[-1] / hist[-1].sum(-1, keepdim=True), hist[0] / hist[0].sum(-1, keepdim=True)
    assert torch.allclose(temporal_estimate(hist, gamma, "paper"), latest, atol=1e-5)
    assert torch.allclose(temporal_estimate(hist, gamma, "code"), oldest, atol=1e-5)


def test_code_weighting_reverses_the_order():
    """The reference's order: the latest vector weighs γ^(w−1), the oldest γ^0 = the paper rule on the reversed
    history."""
    gen = torch.Generator().manual_seed(9)
    hist = [torch.rand(2, 8, generator=gen) for _ in range(3)]
    g = 0.8
    code = temporal_estimate(hist, g, "code")
    assert torch.allclose(code, temporal_estimate(hist[::-1], g, "paper"), atol=1e-7)
    raw = sum(g**j * h.double() for j, h in enumerate(hist))  # j = 0 oldest weighs γ^0
    assert torch.allclose(code.double(), raw / raw.sum(-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(code, temporal_estimate(hist, g, "paper"))


def test_temporal_estimate_edge_cases():
    """One vector = itself normalised; a NaN / inf slot is NaN (ranks last), the rest sums to 1; an all-zero
    history (nothing attended yet) is uniform; bad arguments are refused."""
    h = torch.tensor([[1.0, 3.0, 0.0, 4.0]])
    assert torch.allclose(temporal_estimate([h], 0.8), h / 8)
    bad = h.clone()
    bad[0, 1] = float("nan")
    prev = torch.tensor([[1.0, 1.0, float("inf"), 1.0]])
    est = temporal_estimate([prev, bad], 0.5)
    assert torch.isnan(est[0, 1]) and torch.isnan(est[0, 2])
    assert torch.allclose(est[0, [0, 3]].sum(), torch.tensor(1.0))
    assert torch.equal(temporal_estimate([torch.zeros(2, 4)] * 3, 0.8), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="history must be a non-empty list"):
        temporal_estimate([], 0.8)
    with pytest.raises(ValueError, match="history must be a non-empty list"):
        temporal_estimate(torch.rand(3, 1, 4), 0.8)
    with pytest.raises(ValueError, match="one shape"):
        temporal_estimate([torch.rand(1, 4), torch.rand(1, 5)], 0.8)
    with pytest.raises(ValueError, match=r"option gamma must be a number in \(0, 1\]"):
        temporal_estimate([h], 0.0)
    with pytest.raises(ValueError, match="option weighting must be one of 'paper', 'code'"):
        temporal_estimate([h], 0.8, "reversed")


def test_estimate_feeds_the_action_criterion():
    """End to end over three control steps: the estimate's top tokens are C_act; with γ → 0 and no prefill
    preference overlap the kept set comes from the latest recorded vector and the prefill criterion."""
    n, keep = 12, 3
    steps = [torch.zeros(1, n) for _ in range(3)]
    for s, hot in zip(steps, ([0, 1, 2], [3, 4, 5], [6, 7, 8])):
        s[0, hot] = 1.0
    est = temporal_estimate(steps, 1e-9)
    prefill = torch.zeros(1, n)
    prefill[0, [6, 7, 8]] = 1.0  # agrees with the latest step
    out = vla_pruner_select(torch.randn(1, n, 4), keep, prefill_attention=prefill, action_attention=est)
    assert out.tolist() == [[6, 7, 8]]
    code = temporal_estimate(steps, 1e-9, "code")  # the reference order follows the oldest step instead
    out = vla_pruner_select(torch.randn(1, n, 4), keep, prefill_attention=prefill, action_attention=code)
    assert set(out[0].tolist()) <= {0, 1, 2, 6, 7, 8}


def test_criterion_counts():
    prefill = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.7, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    action = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    # row 0: C_vl = {0, 1, 4}, C_act = {1, 2, 3}; row 1: both {3, 4, 5}
    kept = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert criterion_counts(kept, prefill, action, 3).tolist() == [[1, 1, 1], [0, 0, 3]]
    padded = torch.tensor([[0, 4, -1], [3, -1, -1]])  # -1 padding is not counted
    assert criterion_counts(padded, prefill, action, 3).tolist() == [[2, 0, 0], [0, 0, 1]]
    vm = torch.ones(2, 6, dtype=torch.bool)
    vm[0, 1] = False  # token 1 leaves both criteria: C_vl = {0, 4, 2 or 3}, C_act = {2, 3, 4 or 5}
    assert criterion_counts(torch.tensor([[0, 2, 4], [3, 4, 5]]), prefill, action, 3,
                            valid_mask=vm).tolist() == [[1, 0, 2], [0, 0, 3]]
    out = vla_pruner_select(torch.randn(2, 6, 4), 3, prefill_attention=prefill, action_attention=action)
    assert criterion_counts(out, prefill, action, 3).sum(1).tolist() == [3, 3]


# ---------------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("option,value,message", [
    ("gamma", 2, r"vla_pruner: option gamma must be a number in \(0, 1\], got 2"),
    ("gamma", 0, r"option gamma must be a number in \(0, 1\], got 0"),
    ("gamma", float("nan"), r"option gamma must be a number in \(0, 1\]"),
    ("window", 0, r"vla_pruner: option window must be an int in \[1, inf\), got 0"),
    ("window", 2.0, r"option window must be an int"),
    ("window", True, r"option window must be an int"),
    ("weighting", "reversed", r"vla_pruner: option weighting must be one of 'paper', 'code', got 'reversed'"),
    ("record_layer", -1, r"vla_pruner: option record_layer must be an int in \[0, inf\), got -1"),
    ("record_layer", 15.0, r"option record_layer must be an int"),
])
def test_bad_options_fail_at_config_time(option, value, message):
    with pytest.raises(ValueError, match=message):
        vtprune.PruneConfig.from_dict({"method": "vla_pruner", "keep": 4, option: value}).validate()


def test_good_options_are_accepted():
    for opts in ({}, {"window": 1, "gamma": 1.0, "weighting": "code", "record_layer": 0},
                 {"window": 5, "gamma": 1e-3, "record_layer": None}, {"record_layer": 15}):
        cfg = vtprune.PruneConfig.from_dict({"method": "vla_pruner", "keep": 4, **opts}).validate()
        stage = cfg.resolved(32).stages[0]
        assert stage.layer == 3 and stage.method == "vla_pruner"
    with pytest.raises(ValueError, match="unknown option"):
        vtprune.PruneConfig.from_dict({"method": "vla_pruner", "keep": 4, "decay": 0.5}).validate()
