"""FasterVLM and GlobalCom² on LLaVA-NeXT equal the reference code's math (docs/methods/{fastervlm,globalcom2}.md).

The expected kept sets are re-derived here from the reference's description, on the tiny models' own ViT rows
(eager attention probabilities for FasterVLM, pre-softmax logits recomputed from the last layer's q/k for
GlobalCom²) and the reference's own geometry (best-fit grid, stitching, ``unpad_image``, the thumbnail block split,
interpolate-then-split global prior). Nothing here calls vtprune's selector or adapter helpers for the expected side.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import vtprune
from tests.families import batch, eager_vision_copy, model_and_processor
from tests.test_selectors import assert_contract
from vtprune.selectors.fastervlm import fastervlm_select, subimage_budgets
from vtprune.selectors.globalcom2 import globalcom2_crop_ratios
from vtprune.testing import tiny_image, tiny_llava

S = 56  # tiny image size; LLaVA-NeXT's 336 scaled by 1/6
SIDE = 4  # patches per side of a sub-image (56 / 14)
# LLaVA-NeXT's pinpoints ((h, w) of 336 multiples) at the tiny scale: 1x2, 2x1, 2x2, 3x1, 1x3 grids
NEXT_PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]


@functools.cache
def _next_model(pinpoints: tuple[tuple[int, int], ...] | None):
    model, proc = tiny_llava("llava_next")
    if pinpoints is not None:
        proc = copy.deepcopy(proc)
        model.config.image_grid_pinpoints = [list(p) for p in pinpoints]
        proc.image_processor.image_grid_pinpoints = [list(p) for p in pinpoints]
    return model, proc


def next_model(pinpoints=None):
    model, proc = _next_model(None if pinpoints is None else tuple(tuple(p) for p in pinpoints))
    return copy.deepcopy(model), proc


def next_inputs(proc, sizes: list[tuple[int, int]]):
    """One prompt per image (W, H), left-padded batch."""
    images = [tiny_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    text = ["USER: <image>\nwhat is it? ASSISTANT:"] * len(sizes)
    return proc(images=images, text=text, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------------------------ reference re-derivation


def ref_grid(h: int, w: int, pinpoints) -> tuple[int, int]:
    """LLaVA's best-fit resolution: most effective pixels, then least waste; (rows, cols) of S-sized crops."""
    best, key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        k = (eff, -(ph * pw - eff))
        if key is None or k > key:
            best, key = (ph, pw), k
    return best[0] // S, best[1] // S


def ref_unpad(h: int, w: int, gh: int, gw: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of the stitched (gh·SIDE) × (gw·SIDE) map that ``unpad_image`` keeps."""
    cur_h, cur_w = gh * SIDE, gw * SIDE
    if w / h > cur_w / cur_h:
        pad = (cur_h - int(h * (cur_w / w))) // 2
        return pad, cur_h - pad, 0, cur_w
    pad = (cur_w - int(w * (cur_h / h))) // 2
    return 0, cur_h, pad, cur_w - pad


class Layout:
    """The packed LLaVA-NeXT sequence of one image: base (SIDE²), then the unpadded crop map, newline per row."""

    def __init__(self, h: int, w: int, pinpoints):
        self.gh, self.gw = ref_grid(h, w, pinpoints)
        self.r0, self.r1, self.c0, self.c1 = ref_unpad(h, w, self.gh, self.gw)
        self.width = self.c1 - self.c0
        self.n = SIDE * SIDE + (self.r1 - self.r0) * (self.width + 1)
        self.n_sub = 1 + self.gh * self.gw

    def packed(self, y: int, x: int) -> int | None:
        """Packed index of stitched-map cell (y, x), None where unpadding removed it."""
        if not (self.r0 <= y < self.r1 and self.c0 <= x < self.c1):
            return None
        return SIDE * SIDE + (y - self.r0) * (self.width + 1) + (x - self.c0)

    def crop_cells(self, c: int) -> list[tuple[int, int]]:
        """Stitched-map cells of crop c (1-based, raster over the grid), row-major: the crop's own patch order."""
        a, b = divmod(c - 1, self.gw)
        return [(a * SIDE + i, b * SIDE + j) for i in range(SIDE) for j in range(SIDE)]

    def newlines(self) -> list[int]:
        return [SIDE * SIDE + r * (self.width + 1) + self.width for r in range(self.r1 - self.r0)]

    def signal(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sub-image rows [n_sub, SIDE²] -> (values, valid) over the packed sequence (newlines invalid)."""
        val = torch.zeros(self.n, dtype=rows.dtype)
        ok = torch.zeros(self.n, dtype=torch.bool)
        val[: SIDE * SIDE], ok[: SIDE * SIDE] = rows[0], True
        for c in range(1, self.n_sub):
            for p, (y, x) in enumerate(self.crop_cells(c)):
                k = self.packed(y, x)
                if k is not None:
                    val[k], ok[k] = rows[c, p], True
        return val, ok


def desc(v: torch.Tensor) -> torch.Tensor:
    return torch.sort(v.double(), descending=True, stable=True).indices  # ties to the lower index


def eager_probs(model, inputs) -> torch.Tensor:
    """[sub-images, SIDE²] head-mean [CLS]->patch attention probabilities of ViT layer -2 (eager attention)."""
    eager = eager_vision_copy(model)
    with torch.no_grad():
        out = eager.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             output_attentions=True, return_dict=True, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default")
    return out.attentions[-2][:, :, 0, 1:].mean(1)


def last_layer_logits(model, inputs) -> torch.Tensor:
    """[sub-images, SIDE²] head-mean pre-softmax scaled [CLS] logits of the last ViT layer, from its own q/k."""
    tower = model.model.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    seen = []
    handle = attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    finally:
        handle.remove()
    h = seen[0]
    n, length, _ = h.shape
    with torch.no_grad():
        q = attn.q_proj(h).view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2).double()
        k = attn.k_proj(h).view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2).double()
    return (q[:, :, :1] @ k.transpose(-1, -2) * attn.scale)[:, :, 0, 1:].mean(1)


def sub_rows(rows: torch.Tensor, layouts: list[Layout]) -> list[torch.Tensor]:
    out, start = [], 0
    for lay in layouts:
        out.append(rows[start:start + lay.n_sub])
        start += lay.n_sub
    assert start == rows.shape[0]
    return out


def ref_fastervlm(probs: torch.Tensor, lay: Layout, keep: int) -> list[int]:
    """FasterVLM reference on one image: top-T of each sub-image over all its SIDE² patches (T from splitting
    ``keep`` evenly, the first ``keep % n_sub`` sub-images one more), crops stitched and unpadded, newlines kept."""
    kept = []
    for s in range(lay.n_sub):
        t = keep // lay.n_sub + (1 if s < keep % lay.n_sub else 0)
        for p in desc(probs[s])[:t].tolist():
            if s == 0:
                kept.append(p)
            else:
                k = lay.packed(*lay.crop_cells(s)[p])
                if k is not None:  # chosen in the padding: gone with it
                    kept.append(k)
    return sorted(kept + lay.newlines())


def ref_crop_ratios(thumb: torch.Tensor, gh: int, gw: int, r: float, tau: float) -> list[float]:
    """``generate_scale_for_crop_features``: thumbnail SIDE×SIDE split into gh×gw blocks of SIDE//g (at least 1)
    rows/columns, the last block taking the rest; softmax of the shifted masses / tau (+1e-8 in the denominator);
    r·(1 + p − mean p), clipped at 1."""
    side = int(round(thumb.numel() ** 0.5))
    bh, bw = max(side // gh, 1), max(side // gw, 1)
    mass = [0.0] * (gh * gw)
    for idx, v in enumerate(thumb.tolist()):
        i, j = divmod(idx, side)
        mass[min(i // bh, gh - 1) * gw + min(j // bw, gw - 1)] += v
    e = [math.exp((m - max(mass)) / tau) for m in mass]
    p = [x / (sum(e) + 1e-8) for x in e]
    return [min(r * (1 + pc - sum(p) / len(p)), 1.0) for pc in p]


def ref_quotas(n0: int, sizes: list[int], r: float, ratios: list[float], keep: int) -> list[int]:
    """vtprune's documented exact-budget rule on top of the reference counts (docs/methods/globalcom2.md)."""
    target = [r * n0] + [n * rc for n, rc in zip(sizes, ratios)]
    cap = [n0, *sizes]
    q = [min(math.floor(target[0] + 0.5), n0)] + [min(math.floor(t), n) for t, n in zip(target[1:], sizes)]
    while sum(q) < keep:
        i = max((p for p in range(len(q)) if q[p] < cap[p]), key=lambda p: (target[p] - q[p], -p))
        q[i] += 1
    while sum(q) > keep:
        i = min((p for p in range(len(q)) if q[p] > 0), key=lambda p: (target[p] - q[p], p))
        q[i] -= 1
    return q


def ref_globalcom2(logits: torch.Tensor, lay: Layout, keep: int, tau: float) -> tuple[list[int], list[float]]:
    """GlobalCom² reference on one image (with vtprune's exact budget, r = keep / non-newline tokens): thumbnail
    top by logit; crop ratios from the thumbnail blocks; crop tokens by L2-normalised local logits + L2-normalised
    thumbnail map bilinearly interpolated to the unpadded crop map and split crop by crop (widths accumulate along a
    row, heights down the first column); newlines kept."""
    n_valid = lay.n - (lay.r1 - lay.r0)
    r = keep / n_valid
    ratios = ref_crop_ratios(logits[0], lay.gh, lay.gw, r, tau)
    interp = F.interpolate(logits[0].view(1, 1, SIDE, SIDE), size=(lay.r1 - lay.r0, lay.width), mode="bilinear",
                           align_corners=False)[0, 0]
    scores, members, cur_h = [], [], 0
    for a in range(lay.gh):
        cur_w, row_h = 0, None
        for b in range(lay.gw):
            c = 1 + a * lay.gw + b
            cells = [(p, lay.packed(y, x)) for p, (y, x) in enumerate(lay.crop_cells(c))]
            cells = [(p, k) for p, k in cells if k is not None]
            ys = {(k - SIDE * SIDE) // (lay.width + 1) for _, k in cells}
            xs = {(k - SIDE * SIDE) % (lay.width + 1) for _, k in cells}
            ch, cw = len(ys), len(xs)
            row_h = ch if row_h is None else row_h
            loc = logits[c, [p for p, _ in cells]]
            glo = interp[cur_h:cur_h + ch, cur_w:cur_w + cw].flatten()
            cur_w += cw
            if cells:
                scores.append(loc / loc.norm() + glo / glo.norm())
            else:
                scores.append(torch.zeros(0, dtype=torch.float64))
            members.append([k for _, k in cells])
        cur_h += row_h
    q = ref_quotas(SIDE * SIDE, [len(m) for m in members], r, ratios, keep)
    kept = desc(logits[0])[: q[0]].tolist()
    for qc, sc, mem in zip(q[1:], scores, members):
        kept += [mem[i] for i in desc(sc)[:qc].tolist()]
    return sorted(kept + lay.newlines()), ratios


def run_pruned(model, inputs, **prune_kw):
    vtprune.prune(model, **prune_kw)
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    vtprune.unprune(model)
    return rep


# ==================================================================================================== FasterVLM

# (W, H) of the images, with the grid each gets: padded rows or columns, and (wide 3x3) crops removed whole
FV_CASES = [
    (None, [(100, 80), (60, 60), (60, 130)]),  # tests/families.py's LLaVA-NeXT images
    (NEXT_PINPOINTS, [(67, 167), (167, 67)]),  # 400x1000 and 1000x400 at the tiny scale: 3x1 and 1x3 grids
    ([[3 * S, 3 * S]], [(168, 20)]),  # 3x3 grid, only the middle crop row survives unpadding
]


@pytest.mark.parametrize("pinpoints,sizes", FV_CASES)
def test_fastervlm_per_subimage_equals_reference_top_t_then_unpad(pinpoints, sizes):
    model, proc = next_model(pinpoints)
    inputs = next_inputs(proc, sizes)
    pin = model.config.image_grid_pinpoints
    layouts = [Layout(h, w, pin) for h, w in inputs["image_sizes"].tolist()]
    probs = sub_rows(eager_probs(model, inputs), layouts)
    short = 0
    # 3 per sub-image of a 10-sub-image image; a budget that does not split evenly; a large one, whose shares reach
    # into the padding (the padding's flat patches draw little attention, so small shares rarely do)
    big = min(lay.n - len(lay.newlines()) for lay in layouts) - 1
    for keep in (3 * 10, 13, big):
        rep = run_pruned(model, inputs, method="fastervlm", keep=keep)
        for im, lay, pr in zip(rep.images, layouts, probs):
            assert im.n_before == lay.n  # the reference's unpad lays the image out as the model does
            n_valid = lay.n - len(lay.newlines())
            # a budget covering every token keeps every token (vtprune's identity rule)
            exp = ref_fastervlm(pr, lay, keep) if keep < n_valid else list(range(lay.n))
            assert im.kept.tolist() == exp
            assert im.n_newline == len(lay.newlines())  # every newline slot kept, none counted
            short += im.n_after - im.n_newline < min(keep, n_valid)
    assert short > 0  # some crop lost chosen tokens to unpadding: that path is exercised


def test_fastervlm_per_subimage_keeps_the_split_budget_on_every_sub_image():
    """keep = n_sub·T: the base image keeps exactly T; every crop at most T; a crop removed whole keeps nothing."""
    model, proc = next_model([[3 * S, 3 * S]])
    inputs = next_inputs(proc, [(168, 20)])
    lay = Layout(20, 168, model.config.image_grid_pinpoints)
    assert (lay.gh, lay.gw, lay.r1 - lay.r0) == (3, 3, 2)  # crop rows 0 and 2 are padding only
    rep = run_pruned(model, inputs, method="fastervlm", keep=10 * 2)
    kept = rep.images[0].kept
    assert int((kept < SIDE * SIDE).sum()) == 2
    assert len(kept) - 2 - len(lay.newlines()) <= 3 * 2  # three surviving crops, T = 2 each


@pytest.mark.parametrize("pinpoints,sizes", FV_CASES[:2])
def test_fastervlm_image_budget_is_one_ranking_over_the_packed_image(pinpoints, sizes):
    model, proc = next_model(pinpoints)
    inputs = next_inputs(proc, sizes)
    layouts = [Layout(h, w, model.config.image_grid_pinpoints) for h, w in inputs["image_sizes"].tolist()]
    probs = sub_rows(eager_probs(model, inputs), layouts)
    keep = 13
    rep = run_pruned(model, inputs, method="fastervlm", keep=keep, budget="image")
    for im, lay, pr in zip(rep.images, layouts, probs):
        val, ok = lay.signal(pr)
        exp = desc(val.masked_fill(~ok, -1.0))[:keep].tolist()
        assert im.kept.tolist() == sorted(exp + lay.newlines())
        assert im.n_after - im.n_newline == keep  # exact


def test_fastervlm_budget_option_is_checked_at_prune_time():
    model, _ = model_and_processor("llava_next")
    with pytest.raises(ValueError, match=r"fastervlm: option budget must be one of 'per_subimage', 'image', got 'x'"):
        vtprune.prune(model, method="fastervlm", keep=4, budget="x")
    assert not vtprune.is_pruned(model)
    with pytest.raises(ValueError, match=r"globalcom2: option tau must be a number > 0"):
        vtprune.prune(model, method="globalcom2", keep=4, tau=-1.0)
    assert not vtprune.is_pruned(model)


def test_fastervlm_llava_1_5_is_unchanged_by_the_budget_option():
    """One sub-image per image (no subimage_rank from the adapter): both budgets are the plain top-keep."""
    model, _ = model_and_processor("llava")
    inputs = batch("llava", [0, 1])
    a = run_pruned(model, inputs, method="fastervlm", keep=5)
    b = run_pruned(model, inputs, method="fastervlm", keep=5, budget="image")
    assert [im.kept.tolist() for im in a.images] == [im.kept.tolist() for im in b.images]


def _standalone(gen: torch.Generator, b: int):
    """Two sub-images' worth of tokens per row, a third sub-image removed whole, some tokens of sub-image 1 gone."""
    ids, rank = [], []
    for _ in range(b):
        r0 = torch.randperm(9, generator=gen)
        r1 = torch.randperm(9, generator=gen)
        present = torch.rand(9, generator=gen) < 0.6
        ids.append(torch.cat([torch.zeros(9, dtype=torch.long), torch.ones(int(present.sum()), dtype=torch.long)]))
        rank.append(torch.cat([r0, r1[present]]))
    n = max(x.numel() for x in ids)
    ids = torch.stack([F.pad(x, (0, n - x.numel()), value=1) for x in ids])  # pad with more sub-image-1 tokens
    rank = torch.stack([F.pad(x, (0, n - x.numel()), value=8) for x in rank])
    grid = torch.tensor([1, 2]).expand(b, n, 2)  # 1 + 2 = 3 sub-images
    return n, {"crop_ids": ids, "subimage_rank": rank, "crop_grid": grid, "cls_attention": torch.rand(b, n)}


def test_fastervlm_selector_per_subimage_rule_standalone():
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        b = 3
        n, sig = _standalone(gen, b)
        sig["subimage_rank"] = torch.stack([torch.where(sig["crop_ids"][r] == 1, torch.randperm(n, generator=gen)[
            :n], sig["subimage_rank"][r]) for r in range(b)])  # distinct ranks per sub-image
        for keep in (1, 4, 7, n - 1):
            out = fastervlm_select(torch.zeros(b, n, 2), keep, **sig)
            assert out.shape == (b, keep)
            share = subimage_budgets(keep, torch.full((b,), 3), 3)
            assert (share.sum(1) == keep).all()
            for r in range(b):
                exp = [i for i in range(n) if sig["subimage_rank"][r, i] < share[r, sig["crop_ids"][r, i]]]
                got = out[r][out[r] >= 0].tolist()
                assert got == exp and (out[r][len(got):] == -1).all()
                single = fastervlm_select(torch.zeros(1, n, 2), keep, **{k: v[r : r + 1] for k, v in sig.items()})
                assert torch.equal(single[0], out[r])
        assert torch.equal(fastervlm_select(torch.zeros(b, n, 2), n, **sig), torch.arange(n).expand(b, n))
    # image budget: exact top-keep whatever the sub-image signals say
    out = fastervlm_select(torch.zeros(b, n, 2), 4, budget="image", **sig)
    assert_contract(out, b, n, 4)
    assert torch.equal(out, sig["cls_attention"].topk(4).indices.sort().values)


def test_fastervlm_selector_per_subimage_bad_signals():
    n, sig = _standalone(torch.Generator().manual_seed(6), 2)
    feats = torch.zeros(2, n, 2)
    with pytest.raises(ValueError, match=r"'subimage_rank' also needs the signal 'crop_ids'"):
        fastervlm_select(feats, 3, **{k: v for k, v in sig.items() if k != "crop_ids"})
    with pytest.raises(ValueError, match=r"'subimage_rank' must be an integer tensor"):
        fastervlm_select(feats, 3, **{**sig, "subimage_rank": sig["subimage_rank"].float()})
    with pytest.raises(ValueError, match=r"'crop_ids' exceed the crop grid"):
        fastervlm_select(feats, 3, **{**sig, "crop_grid": torch.zeros_like(sig["crop_grid"])})
    with pytest.raises(ValueError, match=r"must be distinct within each sub-image"):
        fastervlm_select(feats, 3, **{**sig, "subimage_rank": torch.zeros_like(sig["subimage_rank"])})
    with pytest.raises(ValueError, match=r"option budget must be one of"):
        fastervlm_select(feats, 3, budget="tiles", **sig)


# ================================================================================================== GlobalCom²


def test_globalcom2_crop_ratios_follow_the_reference_on_a_padded_3x1_grid_at_llava_next_scale():
    """A 400x1000 (W x H) image on LLaVA-NeXT's 336 geometry: a 3x1 grid of 24x24 crops whose stitched 72x24 map
    unpads to 60 rows (18 / 24 / 18 per crop). The reference splits the 24x24 thumbnail into three 8-row blocks of
    the *padded* grid; signals built as the LLaVA-NeXT adapter lays them out."""
    side, gh, gw, rows = 24, 3, 1, 60
    ty, tx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    thumb_yx = torch.stack([(ty.flatten() + 0.5) / side, (tx.flatten() + 0.5) / side], -1)
    my, mx = torch.meshgrid(torch.arange(rows), torch.arange(side), indexing="ij")
    crop_yx = torch.stack([(my.flatten() + 0.5) / rows, (mx.flatten() + 0.5) / side], -1)
    padded_row = my.flatten() + 6  # unpadding removed 6 rows at the top
    ids = torch.cat([torch.zeros(side * side, dtype=torch.long), 1 + padded_row // side])
    assert torch.bincount(ids).tolist() == [576, 18 * 24, 24 * 24, 18 * 24]
    coords = torch.cat([thumb_yx, crop_yx])
    grid = torch.tensor([gh, gw]).expand(ids.numel(), 2)
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for _ in range(20):
        logits = torch.randn(ids.numel(), generator=gen) * 2
        logits[: side * side] += torch.linspace(0, 3, side).repeat_interleave(side)  # mass grows down the image
        for r, tau in ((0.25, 10.0), (0.1, 3.0)):
            got = globalcom2_crop_ratios(logits, coords, ids, r, tau=tau, crop_grid=grid)
            exp = ref_crop_ratios(logits[: side * side].double(), gh, gw, r, tau)
            assert got.ids == [1, 2, 3]
            torch.testing.assert_close(got.ratios, torch.tensor(exp, dtype=torch.float64), rtol=0, atol=1e-7)
            assert torch.bincount(got.assign).tolist() == [8 * 24] * 3
            old = globalcom2_crop_ratios(logits, coords, ids, r, tau=tau)  # regions from unpadded coords
            worst = max(worst, float((old.ratios - got.ratios).abs().max()))
    assert worst > 0.01  # the unpadded geometry the fallback uses is measurably not the reference's


GC_CASES = [
    (NEXT_PINPOINTS, [(67, 167), (167, 67)]),  # 3x1 (rows padded) and 1x3 (columns padded)
    (None, [(100, 80), (60, 130)]),  # 2x2 with padded rows; 1x2 or 2x1 with padded columns
    ([[3 * S, 3 * S]], [(168, 20)]),  # 3x3, crop rows 0 and 2 removed whole: still in the softmax and 1/C
]


@pytest.mark.parametrize("pinpoints,sizes", GC_CASES)
def test_globalcom2_kept_set_and_ratios_equal_the_reference_on_padded_grids(pinpoints, sizes):
    model, proc = next_model(pinpoints)
    inputs = next_inputs(proc, sizes)
    layouts = [Layout(h, w, model.config.image_grid_pinpoints) for h, w in inputs["image_sizes"].tolist()]
    logits = sub_rows(last_layer_logits(model, inputs), layouts)
    if pinpoints == NEXT_PINPOINTS:
        assert [(lay.gh, lay.gw) for lay in layouts] == [(3, 1), (1, 3)]
    adapter = None
    for keep, tau in ((12, 10.0), (20, 0.05)):  # a sharp tau makes the ratios (and counts) differ across crops
        vtprune.prune(model, method="globalcom2", keep=keep, tau=tau)
        adapter = model._vtprune_state.adapter
        with torch.no_grad():
            model(**inputs)
            images = adapter.encode(dict(inputs), {"crop_ids", "cls_logits", "coords", "crop_grid"})
        rep = vtprune.last_report(model)
        vtprune.unprune(model)
        for im, sig, lay, lg in zip(rep.images, images, layouts, logits):
            assert im.n_before == lay.n
            exp, ratios = ref_globalcom2(lg, lay, keep, tau)
            assert im.kept.tolist() == exp
            cand = ~im.newline
            got = globalcom2_crop_ratios(sig.signals["cls_logits"][cand], sig.signals["coords"][cand],
                                         sig.signals["crop_ids"][cand], keep / int(cand.sum()), tau=tau,
                                         crop_grid=sig.signals["crop_grid"][cand])
            torch.testing.assert_close(got.ratios, torch.tensor(ratios, dtype=torch.float64), rtol=0, atol=1e-6)
