"""HoloV and GlobalCom² selectors: contract and method properties (CPU, seeded, small shapes)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.test_selectors import FLOAT_DTYPES, assert_contract  # one contract check for every selector
from vtprune.selectors.base import SelectorSpec
from vtprune.selectors.globalcom2 import (
    SPEC as GLOBALCOM2_SPEC,
)
from vtprune.selectors.globalcom2 import (
    globalcom2_crop_ratios,
    globalcom2_quotas,
    globalcom2_select,
)
from vtprune.selectors.holov import (
    SPEC as HOLOV_SPEC,
)
from vtprune.selectors.holov import (
    apportion,
    holov_allocation,
    holov_crops,
    holov_plan,
    holov_select,
    tile_shape,
)


def row_signals(signals: dict, r: int) -> dict:
    return {k: (v[r : r + 1] if isinstance(v, torch.Tensor) else v) for k, v in signals.items()}


def test_specs():
    assert isinstance(HOLOV_SPEC, SelectorSpec) and HOLOV_SPEC.name == "holov" and HOLOV_SPEC.fn is holov_select
    assert HOLOV_SPEC.requires == ("cls_attention",) and HOLOV_SPEC.optional == ("crop_ids", "grid")
    assert HOLOV_SPEC.options == {"crops": 16, "alpha": 0.09, "within": "attention"}
    assert GLOBALCOM2_SPEC.name == "globalcom2" and GLOBALCOM2_SPEC.fn is globalcom2_select
    assert GLOBALCOM2_SPEC.requires == ("crop_ids", "cls_logits", "coords")
    assert GLOBALCOM2_SPEC.options == {"tau": 10.0}
    assert HOLOV_SPEC.newlines == GLOBALCOM2_SPEC.newlines == "keep"
    assert "2510.02912" in HOLOV_SPEC.description and "2501.05179" in GLOBALCOM2_SPEC.description


# ============================================================================================================== HoloV


def holov_case(rng: random.Random, gen: torch.Generator, b: int):
    """(n, signals) with one of the three crop rules and, half the time, many attention ties."""
    mode = rng.choice(["contiguous", "grid", "crop_ids"])
    if mode == "grid":
        h, w = rng.randint(1, 9), rng.randint(1, 9)
        n, extra = h * w, {"grid": rng.choice([(h, w), [(h, w)]])}
    else:
        n, extra = rng.randint(1, 70), {}
    if mode == "crop_ids":
        extra["crop_ids"] = torch.randint(0, rng.randint(1, 7), (b, n), generator=gen) * 3  # sparse id values
    if rng.random() < 0.5:
        att = torch.randint(0, 4, (b, n), generator=gen).float() / 8  # exact ties at crop boundaries
    else:
        att = torch.softmax(torch.randn(b, n, generator=gen), -1)
    return n, {"cls_attention": att, "text_features": torch.randn(b, 2, 4, generator=gen), "seed": 3, **extra}


def test_holov_contract_random_cases():
    """Sorted, unique, exact count, in range, deterministic, rows independent, invalid never chosen."""
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    for case in range(70):
        b = rng.randint(1, 3)
        n, sig = holov_case(rng, gen, b)
        feats = torch.randn(b, n, rng.randint(1, 12), generator=gen).to(rng.choice(FLOAT_DTYPES))
        valid = None
        if case % 3 == 0:
            valid = torch.rand(b, n, generator=gen) < 0.7
            valid[:, rng.randrange(n)] = True
        keep = rng.randint(1, n if valid is None else int(valid.sum(1).min()))
        opts = {"crops": rng.randint(1, 20), "alpha": rng.choice([0.0, 0.09, 2.0]),
                "within": rng.choice(["attention", "holistic"])}
        out = holov_select(feats, keep, valid_mask=valid, **sig, **opts)
        assert_contract(out, b, n, keep, valid)
        assert torch.equal(out, holov_select(feats, keep, valid_mask=valid, **sig, **opts)), "not deterministic"
        for r in range(b):
            vr = None if valid is None else valid[r : r + 1]
            single = holov_select(feats[r : r + 1], keep, valid_mask=vr, **row_signals(sig, r), **opts)
            assert torch.equal(single[0], out[r]), f"row {r} depends on other rows"


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_holov_keep_all_is_identity(n):
    gen = torch.Generator().manual_seed(n)
    out = holov_select(torch.randn(2, n, 3, generator=gen), n, cls_attention=torch.rand(2, n, generator=gen))
    assert torch.equal(out, torch.arange(n).expand(2, n))


def test_holov_bad_inputs_name_the_value():
    feats, att = torch.randn(2, 8, 4), torch.rand(2, 8)
    with pytest.raises(ValueError, match=r"holov requires the signal 'cls_attention'"):
        holov_select(feats, 3)
    with pytest.raises(ValueError, match=r"'cls_attention' must have shape \(2, 8\), got \(2, 7\)"):
        holov_select(feats, 3, cls_attention=torch.rand(2, 7))
    with pytest.raises(ValueError, match=r"'cls_attention' must be a tensor.*list"):
        holov_select(feats, 3, cls_attention=[[0.1] * 8] * 2)
    with pytest.raises(ValueError, match=r"'crop_ids' must have shape \(2, 8\), got \(2, 9\)"):
        holov_select(feats, 3, cls_attention=att, crop_ids=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"'crop_ids' must be an integer tensor"):
        holov_select(feats, 3, cls_attention=att, crop_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"grid \(3, 3\) covers 9 tokens but features have N=8"):
        holov_select(feats, 3, cls_attention=att, grid=(3, 3))
    with pytest.raises(ValueError, match=r"'grid' must be \(h, w\)"):
        holov_select(feats, 3, cls_attention=att, grid="2x4")
    with pytest.raises(ValueError, match=r"rank 3"):
        holov_select(feats[0], 3, cls_attention=att[0])
    with pytest.raises(ValueError, match=r"keep must be in \[1, N=8\], got 9"):
        holov_select(feats, 9, cls_attention=att)
    for opts, what in [({"crops": 0}, "crops"), ({"alpha": -1.0}, "alpha"), ({"within": "H"}, "within")]:
        with pytest.raises(ValueError, match=rf"option {what}"):
            holov_select(feats, 3, cls_attention=att, **opts)


def test_holov_allocation_sums_caps_and_floor_rule():
    rng = random.Random(2)
    for _ in range(400):
        c = rng.randint(1, 12)
        sizes = [rng.randint(0, 40) for _ in range(c)]
        if sum(sizes) == 0:
            sizes[0] = 1
        weights = [rng.random() ** 3 for _ in range(c)]
        keep = rng.randint(0, sum(sizes))
        q = holov_allocation(weights, sizes, keep)
        assert sum(q) == keep and all(0 <= x <= s for x, s in zip(q, sizes)), (weights, sizes, keep, q)
        before = apportion(weights, keep)
        assert sum(before) == keep
        w = [x / sum(weights) for x in weights]
        assert all(math.floor(wc * keep) <= x <= math.floor(wc * keep) + 1 for wc, x in zip(w, before))
        if all(x <= s for x, s in zip(before, sizes)):
            assert q == before  # nothing overflows: the reference allocation as it is
        # Leftover units go to the largest weights.
        extra = [x - math.floor(wc * keep) for wc, x in zip(w, before)]
        if 0 < sum(extra) < c:
            got = {i for i in range(c) if extra[i]}
            assert min(w[i] for i in got) >= max(w[i] for i in range(c) if i not in got)


def test_holov_allocation_redistributes_overflow():
    # The heaviest crop has 2 tokens: its quota of 42 overflows and the 40 surplus units go to the others by weight.
    q = holov_allocation([0.7, 0.2, 0.1], [2, 50, 50], 60)
    assert q[0] == 2 and sum(q) == 60 and q[1] > q[2]
    assert q == [2, 39, 19]  # 60 -> [42, 12, 6]; 40 surplus by 2:1 -> [+27, +13]; 13.33/26.67 floors + leftover
    # Cascading overflow: the second crop fills up in the second round.
    q = holov_allocation([0.5, 0.3, 0.1, 0.1], [1, 3, 40, 40], 50)
    assert q[:2] == [1, 3] and sum(q) == 50 and q[2] == q[3] == 23
    # All weight on a crop that is too small, the rest weightless: uniform over the remaining room.
    assert holov_allocation([1.0, 0.0, 0.0], [1, 5, 5], 7) == [1, 3, 3]
    assert holov_allocation([0.0, 0.0], [4, 4], 5) == [3, 2]  # zero weights: uniform, leftover to the first
    with pytest.raises(ValueError, match="outside"):
        holov_allocation([1.0, 1.0], [2, 2], 5)


def test_holov_selector_exact_keep_when_small_crop_dominates():
    gen = torch.Generator().manual_seed(3)
    n = 62
    crop_ids = torch.cat([torch.zeros(2), torch.ones(30), torch.full((30,), 2.0)]).long()[None]
    att = torch.rand(1, n, generator=gen) * 1e-4
    att[0, :2] = 1.0  # crop 0: two tokens, by far the largest weight
    feats = torch.randn(1, n, 8, generator=gen)
    for keep in (10, 40, 61):
        plan = holov_plan(feats[0], keep, att[0], crop_ids=crop_ids[0])
        assert plan.sizes == [2, 30, 30] and plan.quotas[0] == 2 and sum(plan.quotas) == keep
        assert plan.weights[0] > 0.9
        out = holov_select(feats, keep, cls_attention=att, crop_ids=crop_ids)
        assert_contract(out, 1, n, keep)
        assert {0, 1} <= set(out[0].tolist())
        kept_per_crop = torch.bincount(crop_ids[0][out[0]], minlength=3).tolist()
        assert kept_per_crop == plan.quotas


def test_holov_within_crop_ranking_by_attention_or_holistic_score():
    rng, gen = random.Random(4), torch.Generator().manual_seed(4)
    for case in range(40):
        n, sig = holov_case(rng, gen, 1)
        feats = torch.randn(1, n, 6, generator=gen)
        keep = rng.randint(1, n)
        crops = rng.randint(1, 10)
        for within in ("attention", "holistic"):
            out = holov_select(feats, keep, crops=crops, within=within, **sig)[0]
            plan = holov_plan(feats[0], keep, sig["cls_attention"][0], crop_ids=sig.get("crop_ids", [None])[0],
                              grid=sig.get("grid"), crops=crops)
            rank = sig["cls_attention"][0] if within == "attention" else plan.score
            kept = torch.zeros(n, dtype=torch.bool)
            kept[out] = True
            counts = torch.bincount(plan.crop[kept], minlength=len(plan.sizes)).tolist()
            assert counts == plan.quotas, case
            for c in range(len(plan.sizes)):
                inside = plan.crop == c
                if kept[inside].any() and (~kept[inside]).any():
                    assert rank[inside & kept].min() >= rank[inside & ~kept].max(), (case, within, c)


def test_holov_scores_match_direct_float64_formula():
    gen = torch.Generator().manual_seed(5)
    for n, crops, alpha in [(10, 3, 0.09), (23, 4, 1.0), (7, 7, 0.5), (30, 1, 0.09)]:
        feats = torch.randn(n, 5, generator=gen)
        att = torch.softmax(torch.randn(n, generator=gen), -1)
        plan = holov_plan(feats, 4, att, crops=crops, alpha=alpha)
        z = feats.double() / feats.double().norm(dim=-1, keepdim=True)
        means = []
        for c in range(len(plan.sizes)):
            idx = (plan.crop == c).nonzero().flatten().tolist()
            m = len(idx)
            v = torch.zeros(m, dtype=torch.float64)
            if m > 1:
                for a, i in enumerate(idx):
                    sims = [0.0 if j == i else float(z[i] @ z[j]) for j in idx]  # zeroed diagonal, kept in the sums
                    mu = sum(sims) / (m - 1)
                    v[a] = sum((s - mu) ** 2 for s in sims) / (m - 1)
            a1000 = 1000 * att.double()[idx]
            gamma = a1000.abs().mean() / (v.abs().mean() + 1e-6)
            h = a1000 + alpha * gamma * v
            torch.testing.assert_close(plan.score[idx].double(), h, rtol=1e-4, atol=1e-6)
            means.append(float(h.mean()))
        expect_w = [m / sum(means) for m in means]
        assert all(abs(a - b) < 1e-5 for a, b in zip(plan.weights, expect_w))


def test_holov_invariant_to_positive_attention_scaling():
    rng, gen = random.Random(6), torch.Generator().manual_seed(6)
    for _ in range(25):
        n, sig = holov_case(rng, gen, 2)
        feats = torch.randn(2, n, 6, generator=gen)
        keep = rng.randint(1, n)
        base = holov_select(feats, keep, **sig)
        att = sig["cls_attention"]
        for k in (2.0**-7, 2.0**5):  # powers of two scale every float op exactly: allocation and set identical
            assert torch.equal(holov_select(feats, keep, **{**sig, "cls_attention": att * k}), base)
            p0 = holov_plan(feats[0], keep, att[0], crop_ids=sig.get("crop_ids", [None])[0], grid=sig.get("grid"))
            p1 = holov_plan(feats[0], keep, att[0] * k, crop_ids=sig.get("crop_ids", [None])[0],
                            grid=sig.get("grid"))
            assert p0.quotas == p1.quotas and p0.weights == p1.weights
        assert torch.equal(holov_select(feats, keep, **{**sig, "cls_attention": att * 0.37}), base)


def test_holov_alpha_zero_weights_follow_mean_attention():
    gen = torch.Generator().manual_seed(7)
    for crops in (2, 5, 16):
        feats = torch.randn(48, 6, generator=gen)
        att = torch.rand(48, generator=gen)
        plan = holov_plan(feats, 12, att, crops=crops, alpha=0.0)
        means = torch.stack([att[plan.crop == c].double().mean() for c in range(len(plan.sizes))])
        torch.testing.assert_close(torch.tensor(plan.weights, dtype=torch.float64), means / means.sum(),
                                   rtol=1e-5, atol=0)
        assert plan.quotas == holov_allocation(plan.weights, plan.sizes, 12)
    # gamma_c rescales V per crop, so with alpha > 0 every crop's mean H is ~(1 + alpha) x its mean 1000·A: the
    # weights barely move. They do move when a crop has no diversity at all (V = 0, here all-zero tokens), which
    # shows alpha really enters the weights.
    feats = torch.randn(48, 6, generator=gen)
    feats[:24] = 0.0
    att = torch.full((48,), 1 / 48)
    assert holov_plan(feats, 12, att, crops=2, alpha=0.0).weights == [0.5, 0.5]
    w = holov_plan(feats, 12, att, crops=2, alpha=5.0).weights
    assert abs(w[0] - 1 / 7) < 1e-6 and abs(w[1] - 6 / 7) < 1e-6


def test_holov_spatial_tiling_of_a_square_grid():
    crop = holov_crops(576, grid=(24, 24), crops=16)
    assert torch.bincount(crop).tolist() == [36] * 16
    pos = torch.arange(576)
    for c in range(16):
        members = pos[crop == c]
        ys, xs = (members // 24).unique(), (members % 24).unique()
        assert ys.tolist() == list(range(int(ys[0]), int(ys[0]) + 6)) and xs.numel() == 6  # a 6 x 6 block
        assert int(ys[0]) == 6 * (c // 4) and int(xs[0]) == 6 * (c % 4)  # tiles in raster order
    assert torch.equal(holov_crops(576, grid=[(24, 24)], crops=16), crop)
    # Uneven sides: tile sides differ by at most one, the larger ones first.
    crop = holov_crops(35, grid=(5, 7), crops=4)
    assert tile_shape(5, 7, 4) == (2, 2)
    assert torch.bincount(crop).tolist() == [12, 9, 8, 6]  # rows 3 + 2, columns 4 + 3
    assert tile_shape(3, 3, 16) == (3, 3) and tile_shape(1, 10, 4) == (1, 4) and tile_shape(24, 24, 7) == (1, 7)
    # Several segments (e.g. base image then a crop map) split the tiles in proportion to their area.
    crop = holov_crops(16 + 32, grid=[(4, 4), (4, 8)], crops=6)
    assert torch.bincount(crop[:16]).numel() == 2 and crop[:16].max() < crop[16:].min()
    assert torch.bincount(crop).tolist() == [8, 8, 8, 8, 8, 8]


def test_holov_contiguous_fallback_and_crop_id_rules():
    for n in range(1, 60):
        for crops in (1, 4, 16):
            sizes = torch.bincount(holov_crops(n, crops=crops)).tolist()
            c = min(crops, n)
            assert len(sizes) == c and sum(sizes) == n
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert torch.bincount(holov_crops(50, crops=16)).tolist() == [4, 4] + [3] * 14
    ids = torch.tensor([5, 5, 2, 9, 2, 5])
    assert holov_crops(6, crop_ids=ids).tolist() == [1, 1, 0, 2, 0, 1]  # ascending id order, crops ignored
    # A single id falls through to the grid, then to contiguous segments.
    assert torch.equal(holov_crops(36, crop_ids=torch.zeros(36, dtype=torch.long), grid=(6, 6), crops=4),
                       holov_crops(36, grid=(6, 6), crops=4))
    assert torch.equal(holov_crops(36, crop_ids=torch.zeros(36, dtype=torch.long), crops=4), holov_crops(36, crops=4))


def test_holov_left_padded_row_equals_unpadded_run():
    """Contiguous crops are cut over the valid tokens, so left padding does not move the crop boundaries."""
    rng, gen = random.Random(8), torch.Generator().manual_seed(8)
    for _ in range(25):
        m, pad = rng.randint(1, 50), rng.randint(1, 10)
        keep = rng.randint(1, m)
        feats = torch.randn(1, pad + m, 6, generator=gen)
        att = torch.rand(1, pad + m, generator=gen)
        valid = torch.ones(1, pad + m, dtype=torch.bool)
        valid[0, :pad] = False
        crops = rng.randint(1, 16)
        padded = holov_select(feats, keep, valid_mask=valid, cls_attention=att, crops=crops)
        alone = holov_select(feats[:, pad:], keep, cls_attention=att[:, pad:], crops=crops)
        assert torch.equal(padded - pad, alone)


# =========================================================================================================== GlobalCom²


def anyres(rng: random.Random, gen: torch.Generator, b: int = 1, permute: bool = False):
    """A LLaVA-NeXT-like multi-crop image: thumbnail grid, then an unpadded gh x gw crop map in raster order.

    Returns ``(n, signals, truth)`` where ``truth(y, x)`` is the crop id of the map cell containing image point
    (y, x), computed from the layout alone, and ``edge(y, x)`` says whether (y, x) lies on a map cell boundary.
    """
    h0, w0 = rng.randint(2, 6), rng.randint(2, 6)
    gh, gw = rng.choice([(1, 2), (2, 1), (2, 2), (1, 3), (3, 2), (2, 3)])
    ch, cw = rng.randint(1, 5), rng.randint(1, 5)
    big_r, big_c = gh * ch, gw * cw
    top, bottom = (rng.randint(0, (big_r - 1) // 2), 0) if rng.random() < 0.5 else (0, rng.randint(0, (big_r - 1) // 2))
    left, right = (rng.randint(0, (big_c - 1) // 2), 0) if rng.random() < 0.5 else (0, rng.randint(0, (big_c - 1) // 2))
    rows, cols = big_r - top - bottom, big_c - left - right
    ty, tx = torch.meshgrid(torch.arange(h0), torch.arange(w0), indexing="ij")
    thumb = torch.stack([(ty.flatten() + 0.5) / h0, (tx.flatten() + 0.5) / w0], -1).double()
    my, mx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    my, mx = my.flatten(), mx.flatten()
    crop_pts = torch.stack([(my + 0.5) / rows, (mx + 0.5) / cols], -1).double()
    crop_id = 1 + ((my + top) // ch) * gw + (mx + left) // cw
    coords = torch.cat([thumb, crop_pts]).float()
    ids = torch.cat([torch.zeros(h0 * w0, dtype=torch.long), crop_id])
    n = ids.numel()
    logits = torch.randn(b, n, generator=gen) * 3
    coords, ids = coords.expand(b, n, 2).clone(), ids.expand(b, n).clone()
    if permute:  # each row its own token order: different layouts at the same N
        for r in range(b):
            p = torch.randperm(n, generator=gen)
            coords[r], ids[r] = coords[r, p], ids[r, p]

    def truth(y: float, x: float) -> int:
        return 1 + ((math.floor(y * rows) + top) // ch) * gw + (math.floor(x * cols) + left) // cw

    def edge(y: float, x: float) -> bool:
        return min(abs(y * rows - round(y * rows)), abs(x * cols - round(x * cols))) < 1e-6

    sig = {"crop_ids": ids, "cls_logits": logits, "coords": coords}
    return n, sig, (h0, w0, truth, edge)


def bilinear_border(tmap: torch.Tensor, y: float, x: float) -> float:
    """Independent bilinear interpolation of an h0 x w0 map at image point (y, x): cell centres at (i + 0.5)/h0."""
    h0, w0 = tmap.shape

    def axis(u: float, size: int) -> tuple[int, int, float]:
        u = min(max(u * size - 0.5, 0.0), size - 1.0)
        i0 = math.floor(u)
        return i0, min(i0 + 1, size - 1), u - i0

    i0, i1, ty = axis(y, h0)
    j0, j1, tx = axis(x, w0)
    top = tmap[i0, j0] * (1 - tx) + tmap[i0, j1] * tx
    bot = tmap[i1, j0] * (1 - tx) + tmap[i1, j1] * tx
    return float(top * (1 - ty) + bot * ty)


def test_globalcom2_contract_random_cases():
    rng, gen = random.Random(11), torch.Generator().manual_seed(11)
    for case in range(40):
        b = rng.randint(1, 3)
        n, sig, _ = anyres(rng, gen, b, permute=case % 2 == 1)
        sig = {**sig, "cls_attention": torch.rand(b, n, generator=gen), "grid": (1, n)}  # unrelated: ignored
        feats = torch.randn(b, n, 4, generator=gen).to(rng.choice(FLOAT_DTYPES))
        valid = None
        if case % 3 == 0:
            valid = torch.rand(b, n, generator=gen) < 0.8
            valid[:, 0] = True
        keep = rng.randint(1, n if valid is None else int(valid.sum(1).min()))
        tau = rng.choice([10.0, 0.5, 1e3])
        out = globalcom2_select(feats, keep, valid_mask=valid, tau=tau, **sig)
        assert_contract(out, b, n, keep, valid)
        assert torch.equal(out, globalcom2_select(feats, keep, valid_mask=valid, tau=tau, **sig))
        for r in range(b):
            vr = None if valid is None else valid[r : r + 1]
            single = globalcom2_select(feats[r : r + 1], keep, valid_mask=vr, tau=tau, **row_signals(sig, r))
            assert torch.equal(single[0], out[r]), f"row {r} depends on other rows"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_globalcom2_keep_all_is_identity(seed):
    n, sig, _ = anyres(random.Random(seed), torch.Generator().manual_seed(seed), 2)
    assert torch.equal(globalcom2_select(torch.zeros(2, n, 3), n, **sig), torch.arange(n).expand(2, n))


def test_globalcom2_regions_count_every_thumbnail_token_once_in_its_crop():
    """Region rule vs the layout's own geometry, including unpadded crops whose edges cut thumbnail cells."""
    rng, gen = random.Random(12), torch.Generator().manual_seed(12)
    checked = 0
    for _ in range(60):
        n, sig, (h0, w0, truth, edge) = anyres(rng, gen)
        ids, pts, logits = sig["crop_ids"][0], sig["coords"][0], sig["cls_logits"][0]
        cr = globalcom2_crop_ratios(logits, pts, ids, 0.3)
        thumb = (ids == 0).nonzero().flatten()
        assert cr.assign.shape == (h0 * w0,)
        for t, a in zip(thumb.tolist(), cr.assign.tolist()):
            y, x = float(pts[t, 0]), float(pts[t, 1])
            if not edge(y, x):
                assert cr.ids[a] == truth(y, x), (y, x, cr.ids[a], truth(y, x))
                checked += 1
        expect = torch.zeros(len(cr.ids), dtype=torch.float64)
        expect.index_add_(0, cr.assign, logits[thumb].double())
        torch.testing.assert_close(cr.mass, expect)
        torch.testing.assert_close(cr.mass.sum(), logits[thumb].double().sum())
    assert checked > 500


def test_globalcom2_ratio_properties():
    rng, gen = random.Random(13), torch.Generator().manual_seed(13)
    for _ in range(60):
        n, sig, _ = anyres(rng, gen)
        ids, pts, logits = sig["crop_ids"][0], sig["coords"][0], sig["cls_logits"][0]
        c = ids.unique().numel() - 1
        r = rng.uniform(0.02, 0.45)  # r_c <= r * (2 - 1/C) < 1: nothing clips
        cr = globalcom2_crop_ratios(logits, pts, ids, r)
        assert len(cr.ids) == c and cr.ratios.shape == (c,)
        assert abs(float(cr.ratios.sum()) - c * r) < 1e-12
        torch.testing.assert_close(cr.probs, torch.softmax(cr.mass / 10.0, 0))
        torch.testing.assert_close(cr.ratios, r * (1 + cr.probs - 1 / c))
        top = int(cr.mass.argmax())
        if c > 1 and int((cr.mass == cr.mass.max()).sum()) == 1:
            assert int(cr.ratios.argmax()) == top and float(cr.ratios[top]) > r
            assert bool((cr.ratios <= cr.ratios[top]).all())
            # Ratios are ordered like the masses.
            order = cr.mass.argsort()
            assert bool((cr.ratios[order].diff() >= -1e-15).all())
        # tau -> infinity: every crop gets the overall ratio.
        for tau in (1e12, float("inf")):
            flat = globalcom2_crop_ratios(logits, pts, ids, r, tau=tau).ratios
            assert bool(((flat - r).abs() < 1e-9).all())
        # A large ratio clips at 1 and the sum identity no longer holds.
        sharp = globalcom2_crop_ratios(logits * 100, pts, ids, 0.9, tau=1.0).ratios
        assert float(sharp.max()) == 1.0 and bool((sharp <= 1.0).all())


def test_globalcom2_quotas_are_exact_and_move_the_fewest_units():
    rng = random.Random(14)
    for _ in range(400):
        c = rng.randint(1, 8)
        n0 = rng.randint(0, 40)
        sizes = [rng.randint(0, 40) for _ in range(c)]
        n = n0 + sum(sizes)
        if n == 0:
            continue
        keep = rng.randint(0, n)
        r = keep / n
        ratios = [min(1.0, r * (1 + rng.random() * 2 - 1 / c)) for _ in range(c)]
        q = globalcom2_quotas(n0, sizes, r, ratios, keep)
        assert sum(q) == keep and 0 <= q[0] <= n0 and all(0 <= x <= s for x, s in zip(q[1:], sizes))
        start = [min(math.floor(r * n0 + 0.5), n0)] + [math.floor(s * rc) for s, rc in zip(sizes, ratios)]
        if sum(start) == keep:
            assert q == start  # the reference counts, untouched
        elif sum(start) < keep:
            assert all(a >= s for a, s in zip(q, start))  # units only added
        else:
            assert all(a <= s for a, s in zip(q, start))  # units only removed
    # Shortfall goes to the largest remainders, not to the thumbnail when its count was rounded up.
    assert globalcom2_quotas(10, [10, 10], 0.25, [0.29, 0.21], 8) == [3, 3, 2]
    # r = 0.25: targets 2.5 -> 3 (half up), 2.9 -> 2, 2.1 -> 2; 7 < 8: +1 to the crop with remainder 0.9.


def test_globalcom2_crop_scores_are_local_plus_sampled_thumbnail():
    """Within every crop the kept tokens score at least as high as the dropped ones under an independent
    float64 computation of local + global; the thumbnail keeps its highest logits; counts follow the quotas."""
    rng, gen = random.Random(15), torch.Generator().manual_seed(15)
    for _ in range(30):
        n, sig, (h0, w0, _, _) = anyres(rng, gen)
        ids, pts, logits = sig["crop_ids"][0], sig["coords"][0], sig["cls_logits"][0]
        keep = rng.randint(1, n - 1)
        out = globalcom2_select(torch.zeros(1, n, 2), keep, **sig)[0]
        kept = torch.zeros(n, dtype=torch.bool)
        kept[out] = True
        thumb = ids == 0
        tmap = torch.empty(h0, w0, dtype=torch.float64)
        for t in thumb.nonzero().flatten().tolist():
            tmap[int(pts[t, 0] * h0), int(pts[t, 1] * w0)] = float(logits[t])
        score = logits.double().clone()
        crop_list = sorted(set(ids.tolist()) - {0})
        for c in crop_list:
            idx = (ids == c).nonzero().flatten()
            loc = logits[idx].double()
            glo = torch.tensor([bilinear_border(tmap, float(pts[i, 0]), float(pts[i, 1])) for i in idx.tolist()],
                               dtype=torch.float64)
            score[idx] = loc / loc.norm() + glo / glo.norm()
        cr = globalcom2_crop_ratios(logits, pts, ids, keep / n)
        sizes = [int((ids == c).sum()) for c in crop_list]
        quotas = globalcom2_quotas(int(thumb.sum()), sizes, keep / n, cr.ratios.tolist(), keep)
        for g, members in enumerate([thumb] + [ids == c for c in crop_list]):
            assert int((kept & members).sum()) == quotas[g]
            if (kept & members).any() and (~kept & members).any():
                assert score[kept & members].min() >= score[~kept & members].max() - 1e-5


def test_globalcom2_thumbnail_keeps_round_r_n0_top_logits():
    """4 x 4 thumbnail over a 2 x 2 crop grid of 4 x 4 tokens each; every crop's thumbnail block sums to 16, so
    p is uniform, r_c = r and the reference counts (round(0.25·16) = 4, floor(16·0.25) = 4 each) already sum to
    keep = 20: no fix-up moves a unit."""
    blocks = [[1.0, 2.0, 3.0, 10.0], [0.0, 4.0, 5.0, 7.0], [-1.0, 6.0, 3.5, 7.5], [2.5, 4.5, 0.5, 8.5]]
    tlog = torch.empty(4, 4)
    for k, vals in enumerate(blocks):
        by, bx = divmod(k, 2)
        tlog[2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2] = torch.tensor(vals).view(2, 2)
    ty, tx = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    thumb = torch.stack([(ty.flatten() + 0.5) / 4, (tx.flatten() + 0.5) / 4], -1)
    my, mx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    my, mx = my.flatten(), mx.flatten()
    crops = torch.stack([(my + 0.5) / 8, (mx + 0.5) / 8], -1)
    ids = torch.cat([torch.zeros(16, dtype=torch.long), 1 + (my // 4) * 2 + mx // 4])
    gen = torch.Generator().manual_seed(16)
    logits = torch.cat([tlog.flatten(), torch.randn(64, generator=gen)])
    sig = {"crop_ids": ids[None], "cls_logits": logits[None], "coords": torch.cat([thumb, crops])[None]}
    cr = globalcom2_crop_ratios(logits, sig["coords"][0], ids, 0.25)
    assert cr.mass.tolist() == [16.0] * 4 and cr.ratios.tolist() == [0.25] * 4
    assert globalcom2_quotas(16, [16] * 4, 0.25, cr.ratios.tolist(), 20) == [4, 4, 4, 4, 4]
    out = globalcom2_select(torch.zeros(1, 80, 2), 20, **sig)[0]
    thumb_kept = out[out < 16].tolist()
    assert thumb_kept == sorted(tlog.flatten().argsort(descending=True)[:4].tolist())  # 10, 8.5, 7.5, 7
    assert sorted(float(tlog.flatten()[i]) for i in thumb_kept) == [7.0, 7.5, 8.5, 10.0]
    assert torch.bincount(ids[out], minlength=5).tolist() == [4, 4, 4, 4, 4]
    # Shift thumbnail mass onto crop 4: it gets the largest ratio and the most tokens; the total stays exact.
    tl2 = tlog.clone()
    tl2[2:, 2:] += 20.0
    logits2 = torch.cat([tl2.flatten(), logits[16:]])
    cr2 = globalcom2_crop_ratios(logits2, sig["coords"][0], ids, 0.25)
    assert int(cr2.ratios.argmax()) == 3 and abs(float(cr2.ratios.sum()) - 1.0) < 1e-12
    out2 = globalcom2_select(torch.zeros(1, 80, 2), 20, **{**sig, "cls_logits": logits2[None]})[0]
    counts = torch.bincount(ids[out2], minlength=5).tolist()
    assert sum(counts) == 20 and counts[4] == max(counts[1:]) > 4 and counts[0] == 4


def test_globalcom2_bad_inputs():
    n, sig, _ = anyres(random.Random(17), torch.Generator().manual_seed(17), 2)
    feats = torch.randn(2, n, 3)
    for name in ("crop_ids", "cls_logits", "coords"):
        rest = {k: v for k, v in sig.items() if k != name}
        with pytest.raises(ValueError, match=rf"globalcom2 requires the signal '{name}'"):
            globalcom2_select(feats, 5, **rest)
    with pytest.raises(ValueError, match=rf"'coords' must have shape \(2, {n}, 2\)"):
        globalcom2_select(feats, 5, **{**sig, "coords": sig["coords"][..., :1]})
    with pytest.raises(ValueError, match=rf"'cls_logits' must have shape \(2, {n}\)"):
        globalcom2_select(feats, 5, **{**sig, "cls_logits": sig["cls_logits"][:, 1:]})
    with pytest.raises(ValueError, match=r"'crop_ids' must hold integer ids"):
        globalcom2_select(feats, 5, **{**sig, "crop_ids": sig["crop_ids"].float()})
    with pytest.raises(ValueError, match=r"option tau"):
        globalcom2_select(feats, 5, tau=0.0, **sig)
    with pytest.raises(ValueError, match=r"keep must be in \[1, N="):
        globalcom2_select(feats, 0, **sig)
    # Single image (no crops): a clear error naming the alternatives.
    single = {**sig, "crop_ids": torch.zeros_like(sig["crop_ids"])}
    with pytest.raises(ValueError, match=r"multi-crop input \(LLaVA-NeXT AnyRes base \+ crops\).*holov.*fastervlm"):
        globalcom2_select(feats, 5, **single)
    # No thumbnail, or a thumbnail whose coords are not a grid.
    with pytest.raises(ValueError, match=r"no thumbnail tokens"):
        globalcom2_select(feats, 5, **{**sig, "crop_ids": sig["crop_ids"] + 1})
    bad = sig["coords"].clone()
    bad[:, 0] = bad[:, 1]  # two thumbnail tokens on the same cell
    with pytest.raises(ValueError, match=r"regular grid"):
        globalcom2_select(feats, 5, **{**sig, "coords": bad})
