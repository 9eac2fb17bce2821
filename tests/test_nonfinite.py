"""Every registered selector keeps its output contract on non-finite features and signals (NaN, +inf, -inf; with and
without ``valid_mask``), and every selector function accepts inputs that require grad."""

from __future__ import annotations

import random

import pytest
import torch

import vtprune
from tests.test_holov_globalcom2 import anyres
from vtprune.registry import get_selector
from vtprune.selectors.base import SIGNALS, rank_desc, topk_sorted

B = 2
GRID = (4, 4)
N = GRID[0] * GRID[1]
NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
# Methods whose lattice / recycling groups need every token of the grid: a partial valid_mask is refused (tested
# in their own files), so "with valid_mask" means an all-True mask for them.
FULL_GRID_ONLY = {"uniform", "vflowopt"}


OPTIONS = {"holov": {"crops": 4}, "atp": {"mass": 0.5}}  # 4 crops of the 4x4 grid; a mass that varies counts


def case(method: str) -> tuple[torch.Tensor, dict]:
    """(features [B, N', D], signals) with every signal ``method`` requires, its optional grid and a few options.

    Signals are built from their declared kind (``SIGNALS``), so a selector that switches to another attention
    signal is still covered: every ``FloatTensor[B, N]`` signal is a row of attention probabilities."""
    gen = torch.Generator().manual_seed(7)
    spec = get_selector(method)
    if method == "globalcom2":
        n, sig, _ = anyres(random.Random(3), gen, b=B)
        return torch.randn(B, n, 8, generator=gen), dict(sig)
    feats = torch.randn(B, N, 8, generator=gen)
    signals: dict = dict(OPTIONS.get(method, {}))
    for name in (*spec.requires, *(s for s in spec.optional if s in ("grid", "seed"))):
        if name == "grid":
            signals[name] = GRID
        elif name == "seed":
            signals[name] = 3
        elif name == "flow_stats":
            signals[name] = torch.rand(B, 3, N, generator=gen)
        elif SIGNALS[name].startswith("FloatTensor[B, N]"):
            signals[name] = torch.rand(B, N, generator=gen).softmax(-1)
        else:
            raise AssertionError(f"no test input for signal {name!r} of {method}")
    return feats, signals


def float_targets(method: str) -> list[str]:
    """``"features"`` and every floating-point tensor signal of the method's case."""
    _, signals = case(method)
    return ["features"] + [k for k, v in signals.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def poison(t: torch.Tensor, tokens: list[int], value: float, token_dim: int) -> torch.Tensor:
    """A copy of ``t`` with ``value`` written into one entry of each listed token of every row."""
    t = t.clone()
    for j, tok in enumerate(tokens):
        index = [slice(None)] * t.dim()
        index[token_dim] = tok
        if t.dim() == 3:  # [B, N, D] / [B, N, 2] (token dim 1) or flow_stats [B, 3, N] (token dim 2)
            index[2 if token_dim == 1 else 1] = j % t.shape[2 if token_dim == 1 else 1]
        t[tuple(index)] = value
    return t


def mask_for(method: str, n: int) -> torch.Tensor:
    vm = torch.ones(B, n, dtype=torch.bool)
    if method not in FULL_GRID_ONLY:
        vm[0, [1, 2, n - 1]] = False  # n - 1 is also poisoned: a bad value on a masked token must stay out
        vm[1, [0, n // 2 + 1]] = False
    return vm


def assert_contract(idx: torch.Tensor, keep: int, n: int, valid_mask: torch.Tensor | None, adaptive: bool):
    assert idx.dtype == torch.long and tuple(idx.shape) == (B, keep), (idx.dtype, idx.shape)
    for r in range(B):
        row = idx[r]
        real = row[row >= 0]
        if adaptive:  # real indices first, then -1 padding only
            assert torch.equal(row[: real.numel()], real) and bool((row[real.numel():] == -1).all()), row
            assert real.numel() >= 1
        else:
            assert real.numel() == keep, row
        assert bool((real[1:] > real[:-1]).all()), f"not strictly ascending (duplicates?): {row.tolist()}"
        assert bool((real < n).all()), row
        if valid_mask is not None:
            assert bool(valid_mask[r, real].all()), f"kept a masked-out token: {row.tolist()}"


# globalcom2's coords are the layout's patch centres (never computed from pixels): a non-finite coord is a malformed
# signal and raises a ValueError naming it (test_globalcom2_refuses_non_finite_coords), not a contract case.
PENDING = {("globalcom2", "coords")}
CASES = [(m, t, v, masked) for m in vtprune.list_methods() for t in float_targets(m) if (m, t) not in PENDING
         for v in NONFINITE for masked in (False, True)]


@pytest.mark.parametrize("method,target,value,masked", CASES,
                         ids=[f"{m}-{t}-{v}-{'mask' if k else 'nomask'}" for m, t, v, k in CASES])
def test_contract_holds_on_nonfinite_input(method, target, value, masked):
    feats, signals = case(method)
    n = feats.shape[1]
    tokens = [0, n // 2, n - 1]
    if target == "features":
        feats = poison(feats, tokens, NONFINITE[value], 1)
    else:
        signals[target] = poison(signals[target], tokens, NONFINITE[value], 2 if target == "flow_stats" else 1)
    vm = mask_for(method, n) if masked else None
    spec = get_selector(method)
    for keep in (1, n // 2, n - 4):
        idx = vtprune.select_tokens(method, feats, keep, valid_mask=vm, **signals)
        assert_contract(idx, keep, n, vm, spec.adaptive)


# ------------------------------------------------------------------------------------------ what each rule keeps


def test_topk_sorted_ranks_nan_last_and_never_picks_masked():
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[nan, 1.0, -inf, 3.0, inf, 1.0]])
    assert rank_desc(s).tolist() == [[4, 3, 1, 5, 2, 0]]
    assert topk_sorted(s, 3).tolist() == [[1, 3, 4]]
    assert topk_sorted(s, 5).tolist() == [[1, 2, 3, 4, 5]]
    vm = torch.tensor([[True, True, True, True, False, True]])
    assert topk_sorted(s, 5, vm).tolist() == [[0, 1, 2, 3, 5]]  # NaN before masked-out
    assert topk_sorted(torch.full((1, 4), nan), 2).tolist() == [[0, 1]]


@pytest.mark.parametrize("value", list(NONFINITE))
def test_divprune_nonfinite_rows_are_picked_last(value):
    """Finite tokens are picked exactly as if the non-finite ones were absent; those fill in only when needed."""
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(B, N, 8, generator=gen)
    bad = [3, 9]
    feats[:, bad, 0] = NONFINITE[value]
    finite = torch.ones(B, N, dtype=torch.bool)
    finite[:, bad] = False
    for keep in (1, 5, N - 2):
        got = vtprune.select_tokens("divprune", feats, keep)
        assert torch.equal(got, vtprune.select_tokens("divprune", feats.nan_to_num(0.0), keep, valid_mask=finite))
    got = vtprune.select_tokens("divprune", feats, N - 1)
    assert got[:, :].tolist() == [[i for i in range(N) if i != 9]] * B  # all finite, then the lower bad index


def test_divprune_nonfinite_row_gives_no_duplicates():
    feats = torch.randn(1, 8, 4)
    feats[0, 2, 1] = float("nan")
    idx = vtprune.select_tokens("divprune", feats, 6)
    assert idx.unique().numel() == 6


def test_atp_nan_score_never_keeps_a_masked_token():
    att = torch.rand(1, 8).softmax(-1)
    att[0, 3] = float("nan")
    vm = torch.ones(1, 8, dtype=torch.bool)
    vm[0, 0] = False
    idx = vtprune.select_tokens("atp", torch.randn(1, 8, 4), 4, valid_mask=vm, text_attention=att, mass=0.9)
    real = idx[idx >= 0]
    assert 0 not in real.tolist() and 3 not in real.tolist()
    # the finite, valid tokens hold the mass exactly as without the NaN token
    clean = att.clone()
    clean[0, 3] = 0.0
    assert torch.equal(idx, vtprune.select_tokens("atp", torch.randn(1, 8, 4), 4, valid_mask=vm,
                                                  text_attention=clean, mass=0.9))


def test_atp_zero_attention_never_keeps_a_masked_token():
    """All-zero attention keeps ``keep`` tokens (every token is needed to reach any mass), none of them masked."""
    vm = torch.tensor([[False, True, False, True, True, True]])
    idx = vtprune.select_tokens("atp", torch.randn(1, 6, 4), 3, valid_mask=vm, text_attention=torch.zeros(1, 6))
    assert idx.tolist() == [[1, 3, 4]]


@pytest.mark.parametrize("method", ["fastv", "pdrop", "fastervlm", "flowcut", "vflowopt"])
def test_score_selectors_drop_nan_scored_tokens_first(method):
    feats, signals = case(method)
    if method == "vflowopt":
        signals["cells"] = 0  # no recycling: a plain top-k (a summary may sit on any dropped token)
    key = next(k for k, v in signals.items() if isinstance(v, torch.Tensor))
    signals[key] = poison(signals[key], [5], float("nan"), 2 if key == "flow_stats" else 1)
    idx = get_selector(method).fn(feats, N - 1, **signals)
    idx = idx[0] if isinstance(idx, tuple) else idx
    assert all(5 not in row for row in idx.tolist())


def test_holov_nonfinite_attention_ranks_last_in_its_crop_and_features_do_not_poison_weights():
    feats, signals = case("holov")
    att = signals["cls_attention"].clone()
    att[:, 0] = float("nan")
    tile = {0, 1, 4, 5}  # token 0's crop: the top-left 2x2 tile of the 4x4 grid (crops=4)
    dropped_from_tile = 0
    for within in ("attention", "holistic"):
        for keep in (4, 8, 12):
            idx = vtprune.select_tokens("holov", feats, keep, cls_attention=att, grid=GRID, crops=4, within=within)
            for row in idx.tolist():
                if not tile <= set(row):  # the tile keeps fewer than all of its tokens: token 0 goes first
                    assert 0 not in row, (within, keep, row)
                    dropped_from_tile += 1
    assert dropped_from_tile >= 6  # the rule was exercised, not vacuously true
    bad = feats.clone()
    bad[:, 5, 2] = float("inf")
    got = vtprune.select_tokens("holov", bad, 6, cls_attention=signals["cls_attention"], grid=GRID, crops=4)
    zeroed = feats.clone()
    zeroed[:, 5] = 0.0  # documented rule: a non-finite row is a zero vector in the similarities
    want = vtprune.select_tokens("holov", zeroed, 6, cls_attention=signals["cls_attention"], grid=GRID, crops=4)
    assert torch.equal(got, want)


def test_flowcut_nonfinite_stat_leaves_other_scores_unchanged():
    from vtprune.selectors.flowcut import cut_amount, flow_score

    stats = torch.rand(1, 3, 8)
    bad = stats.clone()
    bad[0, 1, 2] = float("nan")
    f = flow_score(bad)
    assert torch.isnan(f[0, 2])
    ref = stats.clone()
    ref[0, :, 2] = 0.0
    assert torch.equal(f[0, [0, 1, 3, 4, 5, 6, 7]], flow_score(ref)[0, [0, 1, 3, 4, 5, 6, 7]])
    att = torch.rand(2, 8)
    att[0, 1] = float("nan")
    assert cut_amount(att, 2, 2) >= 0  # an int, not "cannot convert float NaN to integer"


@pytest.mark.parametrize("value", list(NONFINITE))
def test_vflowopt_nonfinite_feature_does_not_poison_its_group_summary(value):
    """Token 15 (least important, so recycled into the bottom-right group with 10, 11, 14) has a bad feature: it
    weighs nothing, so the summary is the weighted mean of the other members."""
    feats, signals = case("vflowopt")
    feats = feats[:1].clone()
    imp = torch.linspace(1.0, 2.0, N)[None]
    imp[0, [10, 11, 14, 15]] = torch.tensor([0.03, 0.02, 0.01, 0.0])
    feats[0, 15, 0] = NONFINITE[value]
    idx, toks = get_selector("vflowopt").fn(feats, 8, vflow_importance=imp, grid=GRID, cells=2)
    assert bool(torch.isfinite(toks[0][idx[0] >= 0]).all())
    slot = idx[0].tolist().index(10)  # the group's anchor: its most important member
    w = torch.tensor([0.03, 0.02, 0.01]) / 0.06
    torch.testing.assert_close(toks[0, slot], (w[:, None] * feats[0, [10, 11, 14]]).sum(0))


# ------------------------------------------------------------------------------------------------- autograd inputs


@pytest.mark.parametrize("method", vtprune.list_methods())
def test_selector_fn_accepts_inputs_that_require_grad(method):
    """The selector functions themselves (not only select_tokens) accept grad-tracking inputs, with grad enabled,
    and pick what they pick for the detached inputs."""
    feats, signals = case(method)
    spec = get_selector(method)
    keep = feats.shape[1] // 2
    plain = spec.fn(feats, keep, **signals)
    tracked = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in signals.items()}
    f = feats.clone().requires_grad_()
    with torch.enable_grad():
        got = spec.fn(f, keep, **tracked)
    if isinstance(plain, tuple):  # vflowopt: (indices, tokens)
        assert torch.equal(got[0], plain[0])
        assert torch.equal(got[1].detach(), plain[1])
    else:
        assert torch.equal(got, plain)


def test_globalcom2_refuses_non_finite_coords():
    feats, signals = case("globalcom2")
    signals["coords"] = signals["coords"].clone()
    signals["coords"][0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="coords' must be finite"):
        vtprune.select_tokens("globalcom2", feats, 4, **signals)
