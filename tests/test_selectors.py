"""Selector contract and per-method properties (CPU, seeded, no model needed)."""

from __future__ import annotations

import random

import pytest
import torch

from vtprune.registry import get_selector, list_methods
from vtprune.selectors import divprune as divprune_module
from vtprune.selectors.base import SIGNALS, SelectorSpec
from vtprune.selectors.divprune import (
    divprune_order,
    divprune_reference_loop,
    divprune_select,
)
from vtprune.selectors.fastervlm import fastervlm_select
from vtprune.selectors.random import random_select
from vtprune.selectors.uniform import lattice, split_budget, uniform_select

# Every registered selector, except those whose input is a multi-crop layout (their random-layout contract is in
# tests/test_holov_globalcom2.py): the contract below is generic, so a new method is covered by registering it.
METHODS = [m for m in list_methods() if "coords" not in get_selector(m).requires]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------------------- helpers


def assert_contract(idx, b: int, n: int, keep: int, valid: torch.Tensor | None = None, method: str = "") -> None:
    """Sorted, unique, in range, exactly ``keep`` per row — or, for an adaptive selector, its kept tokens first and
    -1 padding after; a merging selector's tokens have one row per index."""
    spec = get_selector(method) if method else None
    if spec is not None and spec.merges:
        idx, toks = idx
        assert toks.shape[:2] == (b, keep), toks.shape
    assert idx.dtype == torch.long, idx.dtype
    assert tuple(idx.shape) == (b, keep), (tuple(idx.shape), (b, keep))
    rows = [row[row >= 0] for row in idx] if spec is not None and (spec.adaptive or spec.merges) else list(idx)
    for r, row in zip(idx, rows):
        assert bool((r[row.numel():] == -1).all()), f"padding must follow the kept tokens: {r}"
        assert row.numel() >= 1 and bool((row[1:] > row[:-1]).all()), f"not strictly ascending: {r}"
        assert int(row.min()) >= 0 and int(row.max()) < n, row
    if valid is not None:
        assert all(bool(valid[i, row].all()) for i, row in enumerate(rows)), "an invalid token was chosen"


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


def make_signals(method: str, b: int, n: int, gen: torch.Generator, ties: bool = False) -> dict:
    """The signals ``method`` requires, built from their declared kind (``SIGNALS``), plus unrelated ones every
    selector must accept and ignore."""
    out = {"text_features": torch.randn(b, 3, 8, generator=gen), "crop_ids": torch.zeros(b, n, dtype=torch.long)}
    spec = get_selector(method)
    for name in spec.requires + tuple(s for s in spec.optional if s == "seed"):
        if name == "seed":
            out[name] = torch.randint(0, 2**31, (b,), generator=gen)
        elif name == "flow_stats":
            out[name] = torch.rand(b, 3, n, generator=gen)
        elif SIGNALS[name].startswith("FloatTensor[B, N]"):
            if ties:  # few distinct values: exercises the lower-index tie-break at the top-k boundary
                out[name] = torch.randint(0, 4, (b, n), generator=gen).float() / 4
            else:
                out[name] = torch.softmax(torch.randn(b, n, generator=gen), dim=-1)
        else:
            raise AssertionError(f"no test input for signal {name!r} of {method}")
    return out


def row_signals(signals: dict, b: int) -> dict:
    """Slice the per-row tensor signals to row ``b``."""
    return {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in signals.items()}


def random_cases(count: int, seed: int, max_n: int = 80):
    rng = random.Random(seed)
    for _ in range(count):
        b, n = rng.randint(1, 4), rng.randint(1, max_n)
        yield b, n, rng.randint(1, 24), rng.randint(1, n), rng.choice(FLOAT_DTYPES), rng


def cos_dist64(x: torch.Tensor) -> torch.Tensor:
    """Independent float64 cosine distance ``[N, N]`` for checking DivPrune's greedy choices."""
    x = x.double()
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - xn @ xn.T


# ------------------------------------------------------------------------------------------ generic contract (all)


def test_registry_specs():
    for method in METHODS:
        spec = get_selector(method)
        assert isinstance(spec, SelectorSpec) and spec.name == method and callable(spec.fn)
    assert get_selector("fastervlm").requires == ("cls_attention",)
    assert "2412.01818" in get_selector("fastervlm").description
    assert get_selector("divprune").newlines == "pool"
    assert get_selector("random").optional == ("seed",)
    assert get_selector("uniform").optional == ("grid",)
    assert {get_selector(m).newlines for m in ("fastervlm", "random", "uniform")} == {"keep"}


@pytest.mark.parametrize("method", METHODS)
def test_contract_random_cases(method):
    """Sorted, unique, exact count, in range, deterministic, rows independent, over 60 random shapes/dtypes."""
    fn = get_selector(method).fn
    gen = torch.Generator().manual_seed(7)
    for case, (b, n, d, keep, dtype, _) in enumerate(random_cases(60, seed=100 + METHODS.index(method))):
        feats = torch.randn(b, n, d, generator=gen).to(dtype)
        signals = make_signals(method, b, n, gen, ties=case % 2 == 0)
        out = fn(feats, keep, **signals)
        assert_contract(out, b, n, keep, method=method)
        assert _same(out, fn(feats, keep, **signals)), "not deterministic"
        for row in range(b):
            single = fn(feats[row : row + 1], keep, **row_signals(signals, row))
            assert _same(tuple(t[0] for t in single) if isinstance(single, tuple) else single[0],
                         tuple(t[row] for t in out) if isinstance(out, tuple) else out[row]), \
                f"{method}: row {row} depends on other rows"


@pytest.mark.parametrize("method", METHODS)
def test_invalid_tokens_never_chosen(method):
    """Tokens whose valid_mask is False are never chosen, even with the highest scores — or a selector that needs
    every token of its grid (a lattice, recycling groups) refuses a partial mask with a clear error."""
    fn = get_selector(method).fn
    gen = torch.Generator().manual_seed(3)
    for b, n, d, _, dtype, rng in random_cases(40, seed=11):
        valid = torch.rand(b, n, generator=gen) < rng.uniform(0.2, 0.9)
        valid[:, rng.randrange(n)] = True  # at least one valid token per row
        keep = rng.randint(1, int(valid.sum(1).min()))
        feats = torch.randn(b, n, d, generator=gen).to(dtype)
        signals = make_signals(method, b, n, gen)
        for name, v in list(signals.items()):  # invalid tokens score highest: they would win without the mask
            if name in get_selector(method).requires and v.is_floating_point() and v.shape == (b, n):
                signals[name] = v.masked_fill(~valid, 10.0)
        if bool(valid.all()):
            continue
        try:
            out = fn(feats, keep, valid_mask=valid, **signals)
        except ValueError as e:
            assert "valid_mask" in str(e), e
            continue
        assert_contract(out, b, n, keep, valid, method=method)
        for row in range(b):
            single = fn(feats[row : row + 1], keep, valid_mask=valid[row : row + 1], **row_signals(signals, row))
            assert _same(tuple(t[0] for t in single) if isinstance(single, tuple) else single[0],
                         tuple(t[row] for t in out) if isinstance(out, tuple) else out[row])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_keep_all_is_identity(method, n):
    gen = torch.Generator().manual_seed(n)
    feats = torch.randn(3, n, 5, generator=gen)
    out = get_selector(method).fn(feats, n, **make_signals(method, 3, n, gen))
    if get_selector(method).adaptive:  # keep is a cap for an adaptive selector (atp): it may still keep fewer
        assert_contract(out, 3, n, n, method=method)
        return
    if isinstance(out, tuple):  # a merging selector keeping everything injects the tokens unchanged
        out, toks = out
        assert torch.equal(toks, feats)
    assert torch.equal(out, torch.arange(n).expand(3, n))


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_name_the_value(method):
    fn = get_selector(method).fn
    feats = torch.randn(2, 8, 4)
    sig = make_signals(method, 2, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"rank 3.*\(8, 4\)"):
        fn(feats[0], 2, **row_signals(sig, 0))
    with pytest.raises(ValueError, match=r"keep must be in \[1, N=8\], got 0"):
        fn(feats, 0, **sig)
    with pytest.raises(ValueError, match=r"keep must be in \[1, N=8\], got 9"):
        fn(feats, 9, **sig)
    with pytest.raises(ValueError, match=r"keep must be an int, got 2\.0"):
        fn(feats, 2.0, **sig)
    with pytest.raises(ValueError, match=r"keep must be an int, got True"):
        fn(feats, True, **sig)
    with pytest.raises(ValueError, match=r"valid_mask must be a bool tensor of shape \(2, 8\)"):
        fn(feats, 2, valid_mask=torch.ones(2, 8), **sig)


def test_bad_signals_name_the_signal():
    feats = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"fastervlm requires the signal 'cls_attention'"):
        fastervlm_select(feats, 3)
    with pytest.raises(ValueError, match=r"'cls_attention' must have shape \(2, 8\), got \(2, 7\)"):
        fastervlm_select(feats, 3, cls_attention=torch.rand(2, 7))
    with pytest.raises(ValueError, match=r"'cls_attention' must be a tensor.*list"):
        fastervlm_select(feats, 3, cls_attention=[[0.1] * 8] * 2)
    with pytest.raises(ValueError, match=r"'seed' tensor must be an integer tensor of shape \(2,\), got \(3,\)"):
        random_select(feats, 3, seed=torch.arange(3))
    with pytest.raises(ValueError, match=r"'seed' must be an int or a LongTensor\[B\], got 1\.5"):
        random_select(feats, 3, seed=1.5)
    with pytest.raises(ValueError, match=r"grid \(3, 3\) covers 9 tokens but features have N=8"):
        uniform_select(feats, 3, grid=(3, 3))
    with pytest.raises(ValueError, match=r"'grid' must be \(h, w\) or a list of \(h, w\) segments, got 'x'"):
        uniform_select(feats, 3, grid="x")
    with pytest.raises(ValueError, match=r"divprune: keep must be in \[1, N=8\], got 0"):
        divprune_reference_loop(feats[0], 0)


# ---------------------------------------------------------------------------------------------------------- fastervlm


def test_fastervlm_is_topk_with_lower_index_ties():
    gen = torch.Generator().manual_seed(5)
    for b, n, d, keep, _, rng in random_cases(60, seed=5):
        att = torch.randint(0, rng.randint(1, 6), (b, n), generator=gen).double() / 7  # many exact ties
        out = fastervlm_select(torch.randn(b, n, d, generator=gen), keep, cls_attention=att)
        for row in range(b):
            scores = att[row].tolist()
            expect = sorted(sorted(range(n), key=lambda j: (-scores[j], j))[:keep])
            assert out[row].tolist() == expect


def test_fastervlm_ignores_features_and_scores_in_fp32():
    gen = torch.Generator().manual_seed(9)
    att = torch.softmax(torch.randn(2, 30, generator=gen), -1)
    a = fastervlm_select(torch.randn(2, 30, 4, generator=gen), 10, cls_attention=att)
    b = fastervlm_select(torch.randn(2, 30, 16, generator=gen).bfloat16(), 10, cls_attention=att.bfloat16())
    assert torch.equal(a, fastervlm_select(torch.zeros(2, 30, 4), 10, cls_attention=att))
    assert_contract(b, 2, 30, 10)
    # Nesting: the top-5 set is inside the top-10 set.
    small = fastervlm_select(torch.zeros(2, 30, 4), 5, cls_attention=att)
    for row in range(2):
        assert set(small[row].tolist()) <= set(a[row].tolist())


# ----------------------------------------------------------------------------------------------------------- divprune


def check_greedy(x: torch.Tensor, order: torch.Tensor, radius: torch.Tensor, valid: torch.Tensor | None = None):
    """Check one row's pick order against a direct float64 computation of every greedy step."""
    n = x.shape[0]
    dist = cos_dist64(x)
    ok = torch.ones(n, dtype=torch.bool) if valid is None else valid
    tol = 1e-5
    nn_dist = dist.masked_fill(torch.eye(n, dtype=torch.bool) | ~ok[None, :], float("inf")).amin(1)
    nn_dist = nn_dist.masked_fill(~ok, float("-inf"))
    first = int(order[0])
    assert bool(ok[first])
    assert nn_dist[first] >= nn_dist.max() - tol, "first pick is not the most isolated token"
    if torch.isfinite(nn_dist[first]):
        assert abs(float(radius[0]) - float(nn_dist[first])) < tol
    picks = order.tolist()
    for t in range(1, len(picks)):
        m = dist[picks[:t]].amin(0)
        cand = ok.clone()
        cand[picks[:t]] = False
        assert bool(cand[picks[t]]), "picked a selected or invalid token"
        best = m[cand].max()
        assert m[picks[t]] >= best - tol, f"step {t} does not maximise the min distance"
        assert abs(float(radius[t]) - float(m[picks[t]])) < tol
    r = radius.double()
    if len(picks) >= 2:
        if torch.isfinite(r[0]):
            assert r[1] >= r[0] - tol, "r_2 < r_1"
        assert bool((r[2:] <= r[1:-1] + tol).all()), "selection radii increase"
        sub = dist[picks][:, picks] + torch.diag(torch.full((len(picks),), float("inf"), dtype=torch.float64))
        assert abs(float(sub.min()) - float(r[-1])) < tol, "min pairwise distance in S != last radius"


def test_divprune_greedy_steps_are_maxmin(divprune_path):
    gen = torch.Generator().manual_seed(21)
    for b, n, d, keep, dtype, rng in random_cases(60, seed=21):
        x = torch.randn(b, n, d, generator=gen).to(dtype)
        valid = None
        if rng.random() < 0.5:
            valid = torch.rand(b, n, generator=gen) < 0.7
            valid[:, 0] = True
            keep = rng.randint(1, int(valid.sum(1).min()))
        order, radius = divprune_order(x, keep, valid_mask=valid)
        assert order.shape == radius.shape == (b, keep)
        sel = divprune_select(x, keep, valid_mask=valid)
        assert torch.equal(sel, order.sort(-1).values)
        for row in range(b):
            assert len(set(order[row].tolist())) == keep
            check_greedy(x[row].float(), order[row], radius[row], None if valid is None else valid[row])


def test_divprune_equals_reference_loop():
    gen = torch.Generator().manual_seed(33)
    shapes = [(n, d, k) for _, n, d, k, *_ in random_cases(40, seed=33, max_n=120)]
    shapes += [(600, 32, 40), (900, 16, 90)]  # N >= 384: the blocked upper-triangle distance path
    for n, d, keep in shapes:
        x = torch.randn(n, d, generator=gen)
        assert torch.equal(divprune_select(x[None], keep)[0], divprune_reference_loop(x, keep))


def test_divprune_masked_row_equals_reference_on_valid_subset():
    gen = torch.Generator().manual_seed(34)
    for _ in range(20):
        x = torch.randn(2, 60, 12, generator=gen)
        valid = torch.rand(2, 60, generator=gen) < 0.6
        keep = int(valid.sum(1).min()) // 2 + 1
        out = divprune_select(x, keep, valid_mask=valid)
        for row in range(2):
            where = valid[row].nonzero().flatten()
            assert torch.equal(out[row], where[divprune_reference_loop(x[row, where], keep)])


def test_divprune_blockwise_and_row_group_paths_match_dense(monkeypatch):
    gen = torch.Generator().manual_seed(35)
    cases = []
    for b, n, d, keep, _, _ in random_cases(25, seed=35, max_n=70):
        x = torch.randn(b, n, d, generator=gen)
        valid = torch.rand(b, n, generator=gen) < 0.8
        valid[:, -1] = True
        keep = min(keep, int(valid.sum(1).min()))
        for vm in (None, valid):
            cases.append((x, keep, vm, divprune_order(x, keep, valid_mask=vm)))
    for attr, value in [("DENSE_MAX_N", 0), ("DENSE_MAX_ELEMENTS", 1), ("BLOCK_ROWS", 7)]:
        with monkeypatch.context() as m:
            # DENSE_MAX_N=0: every N takes the O(N)-memory path (row blocks of BLOCK_ROWS, rows on the fly);
            # DENSE_MAX_ELEMENTS=1: one batch row at a time through the dense path.
            m.setattr(divprune_module, attr, value)
            if attr == "BLOCK_ROWS":
                m.setattr(divprune_module, "DENSE_MAX_N", 0)
            for x, keep, vm, (dense_o, dense_r) in cases:
                other_o, other_r = divprune_order(x, keep, valid_mask=vm)
                assert torch.equal(dense_o, other_o), attr
                assert torch.allclose(dense_r, other_r, atol=1e-5), attr


@pytest.fixture(params=["dense", "blockwise"])
def divprune_path(request, monkeypatch):
    """Run a DivPrune test through the dense matrix path and through the O(N)-memory path."""
    if request.param == "blockwise":
        monkeypatch.setattr(divprune_module, "DENSE_MAX_N", 0)
        monkeypatch.setattr(divprune_module, "BLOCK_ROWS", 8)
    return request.param


def test_divprune_duplicates_give_unique_lowest_index_picks(divprune_path):
    """5 random tokens + 20 copies of one token, keep 10: 10 unique picks (the reference returns 6 unique)."""
    gen = torch.Generator().manual_seed(41)
    for _ in range(10):
        rows = torch.randn(6, 16, generator=gen)
        perm = torch.randperm(25, generator=gen)
        x = torch.empty(25, 16)
        x[perm[:5]] = rows[:5]
        x[perm[5:]] = rows[5]
        order, _ = divprune_order(x[None], 10)
        picks = order[0].tolist()
        assert len(set(picks)) == 10
        group = sorted(perm[5:].tolist())
        # The six distinct directions come first (one group member), then only copies are left.
        assert set(picks[:6]) - set(group) == set(perm[:5].tolist())
        assert len(set(picks[:6]) & set(group)) == 1 and set(picks[6:]) <= set(group)
        if divprune_path == "dense":
            # Copies are exact ties in the Gram matrix, so they go to the lowest indices. The blockwise path
            # computes each row with a matrix-vector product whose tail columns may round differently, so copies
            # there are only near-ties and the order among them is not asserted.
            assert picks[6:] == group[1:5] and group[0] in picks[:6]


def test_divprune_duplicate_groups_at_most_one_each(divprune_path):
    gen = torch.Generator().manual_seed(42)
    for c, copies, keep in [(12, 3, 10), (10, 5, 10), (30, 2, 17)]:
        dirs = torch.randn(c, 24, generator=gen)
        group = torch.arange(c).repeat_interleave(copies)
        perm = torch.randperm(c * copies, generator=gen)
        x, group = dirs[group[perm]], group[perm]
        x = x * torch.rand(c * copies, 1, generator=gen).add(0.5)  # same direction, different lengths
        out = divprune_select(x[None], keep)[0]
        assert len(set(group[out].tolist())) == keep


def test_divprune_invariant_to_positive_rescaling_and_equivariant_to_permutation():
    gen = torch.Generator().manual_seed(43)
    for _, n, d, keep, _, _ in random_cases(30, seed=43, max_n=90):
        # D >= 4: in 1-D every token is one of two directions, exact ties, and ties follow the index order.
        x = torch.randn(1, n, d + 3, generator=gen)
        base = divprune_select(x, keep)
        pow2 = 2.0 ** torch.randint(-20, 20, (1, n, 1), generator=gen).float()
        assert torch.equal(divprune_select(x * pow2, keep), base)  # exact: a power of two cancels bit for bit
        scale = torch.empty(1, n, 1).uniform_(0.01, 100.0, generator=gen)
        assert torch.equal(divprune_select(x * scale, keep), base)
        perm = torch.randperm(n, generator=gen)
        permuted = divprune_select(x[:, perm], keep)
        assert sorted(perm[permuted[0]].tolist()) == base[0].tolist()


def test_divprune_zero_vectors_and_degenerate_rows(divprune_path):
    gen = torch.Generator().manual_seed(44)
    x = torch.randn(2, 30, 8, generator=gen)
    x[0, ::3] = 0.0
    order, radius = divprune_order(x, 12)
    assert not bool(radius.isnan().any())
    assert_contract(order.sort(-1).values, 2, 30, 12)
    check_greedy(x[0], order[0], radius[0])
    # All-zero tokens: every distance is 1, so every step is a tie and the picks are 0, 1, 2, ...
    order, radius = divprune_order(torch.zeros(1, 9, 4), 5)
    assert order[0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(radius[0], torch.ones(5))
    # Only one valid token and keep 1: it is picked, with an infinite nearest-neighbour radius.
    valid = torch.zeros(1, 9, dtype=torch.bool)
    valid[0, 6] = True
    order, radius = divprune_order(torch.randn(1, 9, 4, generator=gen), 1, valid_mask=valid)
    assert order.tolist() == [[6]] and radius[0, 0] == float("inf")


def test_divprune_ignores_other_signals():
    gen = torch.Generator().manual_seed(45)
    x = torch.randn(2, 40, 8, generator=gen)
    plain = divprune_select(x, 7)
    extra = make_signals("fastervlm", 2, 40, gen) | {"seed": 3, "grid": (5, 8)}
    assert torch.equal(divprune_select(x, 7, **extra), plain)


# ------------------------------------------------------------------------------------------------------------- random


def test_random_seeded_and_content_independent():
    x = torch.randn(1, 200, 8)
    a = random_select(x, 20, seed=123)
    assert torch.equal(a, random_select(torch.randn(1, 200, 3), 20, seed=123))
    assert torch.equal(random_select(x, 20), random_select(x, 20, seed=0))
    # Two different seeds give the same 20-of-200 set with probability 1 / C(200, 20) ~ 6e-28.
    assert not torch.equal(a, random_select(x, 20, seed=124))


def test_random_per_row_seeds():
    x = torch.randn(4, 200, 2)
    seeds = torch.tensor([5, 9, 5, -3])
    out = random_select(x, 20, seed=seeds)
    for row, s in enumerate(seeds.tolist()):
        assert torch.equal(out[row], random_select(x[:1], 20, seed=s)[0])
    assert torch.equal(out[0], out[2])
    assert not torch.equal(out[0], out[1])
    assert torch.equal(random_select(x, 20, seed=7), random_select(x, 20, seed=torch.full((4,), 7)))


def test_random_marginal_inclusion_is_uniform():
    """2000 seeded draws of 5 of 20 tokens: each token's count ~ Binomial(2000, 1/4), mean 500, sd 19.4.

    A 6-sd band (+-116) fails by chance with probability ~2e-9 per token; a biased sampler (e.g. first-k,
    or any token with inclusion <= 0.19 or >= 0.31) lands far outside it. The seeds are fixed, so it is
    reproducible anyway.
    """
    draws, n, keep = 2000, 20, 5
    out = random_select(torch.zeros(draws, n, 1), keep, seed=torch.arange(draws))
    counts = torch.bincount(out.flatten(), minlength=n).double()
    assert abs(float(counts.sum()) - draws * keep) == 0
    expected = draws * keep / n
    sd = (draws * (keep / n) * (1 - keep / n)) ** 0.5
    assert bool(((counts - expected).abs() <= 6 * sd).all()), counts
    # Pearson statistic: for 19 degrees of freedom its mean is ~19; 80 is far beyond the 1e-8 tail.
    assert float(((counts - expected) ** 2 / expected).sum()) < 80
    # With a mask the mass is spread evenly over the valid tokens only.
    valid = torch.zeros(draws, n, dtype=torch.bool)
    valid[:, :10] = True
    out = random_select(torch.zeros(draws, n, 1), keep, seed=torch.arange(draws), valid_mask=valid)
    counts = torch.bincount(out.flatten(), minlength=n).double()
    assert counts[10:].sum() == 0
    sd = (draws * 0.5 * 0.5) ** 0.5
    assert bool(((counts[:10] - draws * keep / 10).abs() <= 6 * sd).all()), counts


# ------------------------------------------------------------------------------------------------------------ uniform


def test_uniform_lattice_exact_and_unique():
    for h in range(1, 15):
        for w in range(1, 15):
            for q in range(0, h * w + 1):
                cells = lattice(h, w, q)
                assert len(cells) == q and cells == sorted(set(cells))
                assert all(0 <= c < h * w for c in cells)
                rows = {}
                for c in cells:
                    rows[c // w] = rows.get(c // w, 0) + 1
                if q:
                    assert max(rows.values()) - min(rows.values()) <= 1, (h, w, q, rows)


@pytest.mark.parametrize("q,step,start", [(144, 2, 1), (64, 3, 1), (36, 4, 2), (16, 6, 3), (576, 1, 0)])
def test_uniform_square_lattice(q, step, start):
    out = uniform_select(torch.zeros(2, 576, 1), q, grid=(24, 24))
    assert_contract(out, 2, 576, q)
    side = range(start, 24, step)
    expect = sorted(y * 24 + x for y in side for x in side)
    assert out[0].tolist() == expect and torch.equal(out[0], out[1])


def test_uniform_one_dimensional_is_evenly_spaced():
    out = uniform_select(torch.zeros(1, 100, 3), 10)[0].tolist()
    assert out == list(range(5, 100, 10))
    for n in range(1, 60):
        for keep in range(1, n + 1):
            idx = uniform_select(torch.zeros(1, n, 1), keep)[0]
            assert_contract(idx[None], 1, n, keep)
            gaps = torch.diff(idx)
            if keep > 1:
                assert int(gaps.max()) - int(gaps.min()) <= 1, (n, keep, idx)


def test_uniform_segments_split_by_area():
    for case in range(200):
        rng = random.Random(case)
        areas = [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        keep = rng.randint(1, sum(areas))
        parts = split_budget(areas, keep)
        assert sum(parts) == keep
        assert all(0 <= p <= a for p, a in zip(parts, areas))
        assert all(abs(p - keep * a / sum(areas)) < 1 for p, a in zip(parts, areas))
    grid = [(24, 24), (24, 48)]
    out = uniform_select(torch.zeros(1, 1728, 1), 300, grid=grid)[0]
    assert_contract(out[None], 1, 1728, 300)
    assert int((out < 576).sum()) == 100  # 1/3 of the area -> 1/3 of the budget
    second = out[out >= 576] - 576
    assert sorted(second.tolist()) == lattice(24, 48, 200)
    # Each of the two areas is filled evenly: 10 x 10 on 24 x 24 and 10 x 20 on 24 x 48.
    assert len({int(i) // 48 for i in second}) == 10


def test_uniform_valid_mask_must_be_full():
    x = torch.zeros(2, 16, 1)
    full = torch.ones(2, 16, dtype=torch.bool)
    assert torch.equal(uniform_select(x, 4, valid_mask=full, grid=(4, 4)), uniform_select(x, 4, grid=(4, 4)))
    full[1, 3] = False
    with pytest.raises(ValueError, match=r"uniform needs a full grid.*rows \[1\]"):
        uniform_select(x, 4, valid_mask=full, grid=(4, 4))


def test_uniform_accepts_int_like_grid_and_ignores_content():
    x = torch.randn(1, 12, 4)
    a = uniform_select(x, 4, grid=(torch.tensor(3), torch.tensor(4)))
    assert torch.equal(a, uniform_select(torch.zeros(1, 12, 2), 4, grid=[3, 4]))
    assert torch.equal(a, uniform_select(x, 4, grid=[(3, 4)]))
