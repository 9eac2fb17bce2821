"""HoloV: holistic crop budgeting (NeurIPS'25, arXiv 2510.02912), implemented from SELECTORS.md §6.3.

The visual tokens of an image are split into crops; every token gets a holistic score ``H = 1000·A + α·γ·V``
(``A``: [CLS] attention, ``V``: variance of its cosine similarities to the other tokens of its crop, ``γ`` rescales
``V`` to the attention's magnitude), each crop gets a share of the budget in proportion to its mean ``H``, and the
crop keeps its top tokens by attention (reference) or by ``H`` (paper). The point is spatial coverage: a budget that
follows crop-level evidence instead of clustering every kept token on the most salient region.

Crops, in order of preference: the ``crop_ids`` signal (sub-images / tiles of a multi-crop input), a near-square
tiling of the ``grid`` into ``crops`` tiles, or ``crops`` contiguous segments of the sequence (reference).

Corrected, not reproduced (design notes "Do not reproduce"):

* the reference drops the surplus of a crop whose quota exceeds its size and zero-pads (LLaVA) or ``-1``-pads (Qwen)
  the output up to K; here the surplus is redistributed to the uncapped crops, so exactly ``keep`` real tokens are
  emitted whenever the row has at least ``keep`` valid tokens;
* the reference emits crops in order with descending attention inside each crop; vtprune returns ascending
  indices (``order="sorted"``); the kept *set* is the same;
* K and C are options, not call-site constants.

Options: ``crops`` an int ≥ 1; ``alpha`` a finite number ≥ 0; ``within`` ``"attention"`` or ``"holistic"``.

Non-finite input: a NaN or ±inf [CLS] attention counts as 0 in the crop weights and γ, and the token ranks after
every token with a finite attention inside its crop (with either ``within``); a feature row with a non-finite entry
is treated as a zero vector in the intra-crop similarities (cosine 0 to every other token), so it cannot turn its
crop's diversity into NaN. Tokens whose ``valid_mask`` is False belong to no crop and are never chosen.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, option_choice, option_number, rank_desc
from .uniform import split_budget

NAME = "holov"
EPS = 1e-6  # normalisation / γ guard of the design notes
WITHIN = ("attention", "holistic")


# ------------------------------------------------------------------------------------------------- shared helpers


def even_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total`` that differ by at most one; the first ``total mod parts`` are larger."""
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def apportion(weights: Sequence[float], keep: int) -> list[int]:
    """HoloV's allocation before capping: ``q_c = floor(w_c·keep)``, leftover units one each to the largest weights.

    ``weights`` are clamped at 0 and normalised to sum 1 (uniform if their sum is zero or not finite). Ties go to
    the earlier part. The floors lose less than one unit per part, so the leftover units fit one per part; should
    float rounding leave more (or one too many), they cycle through the same weight order (or come off the largest
    quota), so ``sum(q) == keep`` always.
    """
    w = [max(float(x), 0.0) for x in weights]
    total = sum(w)
    w = [x / total for x in w] if math.isfinite(total) and total > 0 else [1.0 / len(w)] * len(w)
    q = [min(math.floor(x * keep), keep) for x in w]
    while sum(q) > keep:  # w·keep rounded up onto an integer: rare
        q[max(range(len(q)), key=lambda c: (q[c], c))] -= 1
    order = sorted(range(len(w)), key=lambda c: (-w[c], c))
    for u in range(keep - sum(q)):
        q[order[u % len(order)]] += 1
    return q


def holov_allocation(weights: Sequence[float], sizes: Sequence[int], keep: int) -> list[int]:
    """Tokens kept per crop: :func:`apportion`, then overflow redistribution (vtprune's correction).

    Args:
        weights: crop weights ``w_c >= 0``; need not be normalised (they are divided by their sum; a zero or
            non-finite sum falls back to uniform weights).
        sizes: tokens per crop (``>= 0``).
        keep: total budget, ``0 <= keep <= sum(sizes)``.

    Returns:
        ``q_c`` per crop with ``sum(q) == keep`` and ``q_c <= sizes[c]``. A crop whose quota exceeds its size keeps
        all its tokens and its surplus is apportioned again over the crops that still have room, by their weights
        (uniformly if those weights are all zero); this repeats until nothing overflows. Every round caps at least
        one more crop, so it ends after at most ``C`` rounds.
    """
    if len(weights) != len(sizes):
        raise ValueError(f"{NAME}: {len(weights)} weights for {len(sizes)} crops")
    if keep < 0 or keep > sum(sizes):
        raise ValueError(f"{NAME}: budget {keep} outside [0, {sum(sizes)}] (total crop size)")

    q = [0] * len(sizes)
    open_ = list(range(len(sizes)))  # the first round is the reference allocation over every crop
    left = keep
    while left > 0:
        share = apportion([weights[c] for c in open_], left)
        for c, s in zip(open_, share):
            q[c] += s
        left = 0
        for c in open_:
            if q[c] > sizes[c]:
                left += q[c] - sizes[c]
                q[c] = sizes[c]
        open_ = [c for c in open_ if q[c] < sizes[c]]
    return q


def group_topk(score: torch.Tensor, group: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Top ``quota[g]`` tokens of every group ``g`` by ``score`` (ties to the lower index), ascending.

    Args:
        score: ``[N]`` scores (ranked in fp32).
        group: ``LongTensor[N]`` group of every token, ``-1`` = never kept.
        quota: ``LongTensor[G]`` tokens to keep per group, each at most the group's size.

    Returns:
        ``LongTensor[sum(quota)]`` ascending. Vectorised: no host read. A NaN score ranks after every number in its
        group (:func:`vtprune.selectors.base.rank_desc`).
    """
    n = score.numel()
    by_score = rank_desc(score, group >= 0)  # stable: equal scores keep index order
    g = group[by_score]
    by_group = torch.sort(g, stable=True).indices  # groups ascending, each still in descending-score order
    order, g = by_score[by_group], g[by_group]
    counts = torch.bincount(g + 1, minlength=quota.numel() + 1)  # slot 0 counts the excluded tokens (-1)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=score.device) - start[g + 1]
    chosen = (g >= 0) & (rank < quota.to(score.device)[g.clamp(min=0)])
    return order[chosen].sort().values


# ------------------------------------------------------------------------------------------------------------ crops


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)  # ints, numpy ints, 0-d integer tensors; not floats
    except TypeError:
        return None


def _grid_segments(grid: Any, n: int) -> list[tuple[int, int]]:
    """Normalise ``grid`` ((h, w) or a list of (h, w) segments in token order) and check it covers ``n`` tokens."""

    def hw(g: Any) -> tuple[int, int] | None:
        if isinstance(g, (tuple, list)) and len(g) == 2:
            h, w = _as_int(g[0]), _as_int(g[1])
            if h is not None and w is not None and h >= 1 and w >= 1:
                return h, w
        return None

    one = hw(grid)
    if one is not None:
        segs = [one]
    elif isinstance(grid, (tuple, list)) and grid and all(hw(g) is not None for g in grid):
        segs = [hw(g) for g in grid]  # type: ignore[misc]
    else:
        raise ValueError(f"{NAME}: signal 'grid' must be (h, w) or a list of (h, w) segments, got {grid!r}")
    total = sum(h * w for h, w in segs)
    if total != n:
        raise ValueError(f"{NAME}: grid {grid!r} covers {total} tokens but features have N={n}")
    return segs


def tile_shape(h: int, w: int, tiles: int) -> tuple[int, int]:
    """Rows × columns of a near-square tiling of an ``h × w`` grid into (at most) ``tiles`` tiles.

    Among factor pairs ``r·c = t`` with ``r <= h`` and ``c <= w`` it takes the one whose tiles are closest to square
    (ties: fewer rows), for the largest ``t <= tiles`` that has such a pair (``t = 1`` always does), e.g.
    16 tiles of 24 × 24 → 4 × 4 tiles of 6 × 6.
    """
    for t in range(min(tiles, h * w), 0, -1):
        best: tuple[float, int, int] | None = None
        for r in range(1, t + 1):
            c = t // r
            if r * c != t or r > h or c > w:
                continue
            cost = abs(math.log((h / r) / (w / c)))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, r, c)
        if best is not None:
            return best[1], best[2]
    return 1, 1


def _tile_ids(h: int, w: int, tiles: int, device: torch.device) -> torch.Tensor:
    """``LongTensor[h·w]`` tile of every raster position; tile sides differ by at most one (larger ones first)."""
    r, c = tile_shape(h, w, tiles)
    row = torch.repeat_interleave(torch.arange(r, device=device), torch.tensor(even_sizes(h, r), device=device))
    col = torch.repeat_interleave(torch.arange(c, device=device), torch.tensor(even_sizes(w, c), device=device))
    return (row[:, None] * c + col[None, :]).flatten()


def holov_crops(
    n: int,
    *,
    crop_ids: torch.Tensor | None = None,
    grid: Any = None,
    crops: int = 16,
    valid: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Crop of every token of one row.

    Args:
        n: tokens in the row.
        crop_ids: optional ``LongTensor[N]``: sub-image / tile id of every token. Used when the row's valid tokens
            carry at least two distinct ids; each distinct id is one crop (ascending id order) and ``crops`` is
            ignored. A single id (a one-sub-image AnyRes input) would make HoloV plain top-k, so it falls through.
        grid: optional ``(h, w)`` or list of ``(h, w)`` segments covering the N tokens in raster order: each
            segment is tiled into a near-square ``r × c`` tiling (:func:`tile_shape`); with several segments the
            ``crops`` tiles are split over them in proportion to area (at least one each).
        crops: number of crops C for the grid / contiguous rules.
        valid: optional ``BoolTensor[N]``; invalid tokens get crop ``-1``.
        device: device of the result.

    Returns:
        ``LongTensor[N]`` crop index ``0..C'-1`` (``-1`` for invalid tokens); every index labels at least one
        valid token. Without ``crop_ids`` and ``grid`` the valid tokens, in order, are cut into
        ``min(crops, #valid)`` contiguous segments, the first ``#valid mod C`` one longer (reference rule; a
        left-padded row is therefore cut like the same row without padding).
    """
    ok = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(device)
    out = torch.full((n,), -1, dtype=torch.long, device=device)
    if crop_ids is not None:
        ids = crop_ids.to(device)
        uniq, inv = torch.unique(ids[ok], return_inverse=True)
        if uniq.numel() >= 2:
            out[ok] = inv
            return out
    if grid is not None:
        segs = _grid_segments(grid, n)
        areas = [h * w for h, w in segs]
        per = [max(1, p) for p in split_budget(areas, min(crops, n))] if len(segs) > 1 else [crops]
        parts, base = [], 0
        for (h, w), t in zip(segs, per):
            parts.append(_tile_ids(h, w, t, torch.device(device)) + base)
            base += math.prod(tile_shape(h, w, t))
        tile = torch.cat(parts)
        _, inv = torch.unique(tile[ok], return_inverse=True)  # drop tiles without a valid token
        out[ok] = inv
        return out
    m = int(ok.sum())
    c = min(crops, m)
    out[ok] = torch.repeat_interleave(torch.arange(c, device=device), torch.tensor(even_sizes(m, c), device=device))
    return out


# ------------------------------------------------------------------------------------------------------------ score


def crop_diversity(z: torch.Tensor) -> torch.Tensor:
    """Intra-crop diversity ``V [M]`` of the crop's tokens ``z [M, D]`` (fp32).

    Tokens are L2-normalised (norm clamped at ε = 1e-6); ``S = ẑ ẑᵀ`` with a zeroed diagonal;
    ``μ_i = Σ_j S_ij / (M−1)`` and ``V_i = Σ_j (S_ij − μ_i)² / (M−1)``, the sum over every ``j`` including the
    zeroed diagonal entry (reference). A one-token crop has ``V = 0``. A row with a non-finite entry counts as a
    zero vector (cosine 0 to every token), so the crop's ``V`` stays finite.
    """
    m = z.shape[0]
    if m < 2:
        return z.new_zeros(m, dtype=torch.float32)
    zf = z.float()
    zf = torch.where(torch.isfinite(zf).all(-1, keepdim=True), zf, 0.0)
    zn = zf / zf.norm(dim=-1, keepdim=True).clamp_min(EPS)
    s = zn @ zn.T
    s.fill_diagonal_(0.0)
    mu = s.sum(-1, keepdim=True) / (m - 1)
    return ((s - mu) ** 2).sum(-1) / (m - 1)


@dataclass(frozen=True)
class HolovPlan:
    """One row's HoloV budget.

    ``crop``: ``LongTensor[N]`` crop of every token (``-1`` invalid); ``sizes``: valid tokens per crop;
    ``weights``: normalised crop weights ``w_c`` (sum 1); ``quotas``: tokens kept per crop (sum ``keep``);
    ``score``: ``FloatTensor[N]`` holistic score ``H`` (0 for invalid tokens).
    """

    crop: torch.Tensor
    sizes: list[int]
    weights: list[float]
    quotas: list[int]
    score: torch.Tensor


def holov_plan(
    features: torch.Tensor,
    keep: int,
    cls_attention: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    crop_ids: torch.Tensor | None = None,
    grid: Any = None,
    crops: int = 16,
    alpha: float = 0.09,
) -> HolovPlan:
    """Crops, holistic scores, crop weights and per-crop quotas of one row.

    Args:
        features: ``[N, D]`` post-projector tokens (similarities are taken in fp32).
        keep: budget, at most the number of valid tokens.
        cls_attention: ``[N]`` head-mean [CLS] attention ``A``.
        valid, crop_ids, grid, crops: see :func:`holov_crops`.
        alpha: weight of the diversity term.

    Returns:
        :class:`HolovPlan`. ``H_i = 1000·A_i + α·γ_c·V_i`` with ``γ_c = mean|1000·A| / (mean|V| + ε)`` over the crop;
        ``w_c ∝ max(mean_{i∈c} H_i, 0)`` (uniform if all are zero; ``H >= 0`` for attention probabilities, so the
        clamp only matters for signed inputs); quotas from :func:`holov_allocation`.

    Note: ``γ_c`` is per crop, so the diversity term adds about ``α·mean(1000·A_c)`` to every crop's mean and the
    weights stay close to the crops' mean attention; ``V`` mainly reorders tokens inside a crop
    (``within="holistic"``) and only shifts weights for crops with almost no diversity (``mean V ≲ ε``).
    Non-finite attention counts as 0 and non-finite feature rows as zero vectors (see the module docstring).
    """
    n = features.shape[0]
    dev = features.device
    crop = holov_crops(n, crop_ids=crop_ids, grid=grid, crops=crops, valid=valid, device=dev)
    sizes_l = torch.bincount(crop + 1).tolist()[1:]  # slot 0 counts the invalid tokens (crop -1)
    n_crops = len(sizes_l)
    order = torch.argsort(crop, stable=True)[n - sum(sizes_l):]  # valid tokens grouped by crop, in index order
    att = cls_attention.to(dev).float()
    a = 1000.0 * torch.where(torch.isfinite(att), att, 0.0)  # non-finite attention counts as none
    score = torch.zeros(n, dtype=torch.float32, device=dev)
    means = []
    for idx in order.split(sizes_l):  # one small O(M²·D) block per crop instead of O(N²·D) for the whole row
        ac = a[idx]
        v = crop_diversity(features[idx])
        gamma = ac.abs().mean() / (v.abs().mean() + EPS)  # brings V to the attention's scale: invariant to scaling A
        h = ac + alpha * gamma * v
        score[idx] = h
        means.append(h.mean())
    m = torch.stack(means).double().clamp(min=0).tolist()  # one host read per row: the allocation is integer
    total = sum(m)
    weights = [x / total for x in m] if math.isfinite(total) and total > 0 else [1.0 / n_crops] * n_crops
    return HolovPlan(crop=crop, sizes=sizes_l, weights=weights, quotas=holov_allocation(weights, sizes_l, keep),
                     score=score)


# --------------------------------------------------------------------------------------------------------- selector


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad option value and its valid range."""
    if "crops" in options:
        option_number(NAME, "crops", options["crops"], lo=1, integer=True)
    if "alpha" in options:
        option_number(NAME, "alpha", options["alpha"], lo=0)
    if "within" in options:
        option_choice(NAME, "within", options["within"], WITHIN)


def holov_select(
    features: torch.Tensor,
    keep: int,
    *,
    valid_mask: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    crop_ids: torch.Tensor | None = None,
    grid: Any = None,
    crops: int = 16,
    alpha: float = 0.09,
    within: str = "attention",
    **signals: Any,
) -> torch.Tensor:
    """HoloV: split the budget over crops by holistic crop score, then take each crop's top tokens.

    Args:
        features: ``[B, N, D]`` post-projector visual tokens (used for the intra-crop similarities, in fp32).
        keep: tokens to keep per row, ``1 <= keep <= N`` (and at most the row's valid tokens).
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never chosen and belong to no crop.
        cls_attention: required ``FloatTensor[B, N]``, head-mean [CLS]->patch attention.
        crop_ids: optional ``LongTensor[B, N]`` sub-image / tile id per token; each distinct id is one crop (rows
            with a single id fall back to ``grid`` / contiguous crops).
        grid: optional ``(h, w)`` (or list of segments) of the token grid: crops become ``crops`` near-square tiles.
        crops: C for the grid and contiguous rules (default 16, the reference).
        alpha: weight α of the diversity term (default 0.09).
        within: ``"attention"`` ranks inside a crop by ``A`` (reference code), ``"holistic"`` by ``H`` (paper).
        **signals: other adapter signals, ignored.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending (the reference's crop / descending-attention order
        is not reproduced); exactly ``keep`` real tokens per row: a crop's overflow is redistributed, never padded.
    """
    check_inputs(NAME, features, keep, valid_mask)
    check_options({"crops": crops, "alpha": alpha, "within": within})
    b, n, _ = features.shape
    if cls_attention is not None and not isinstance(cls_attention, torch.Tensor):
        raise ValueError(f"{NAME}: signal 'cls_attention' must be a tensor of shape {(b, n)}, "
                         f"got {type(cls_attention).__name__}")
    check_signal(NAME, "cls_attention", cls_attention, shape=(b, n))
    if crop_ids is not None:
        if not isinstance(crop_ids, torch.Tensor) or crop_ids.dtype.is_floating_point or crop_ids.dtype == torch.bool:
            raise ValueError(f"{NAME}: signal 'crop_ids' must be an integer tensor of shape {(b, n)}")
        check_signal(NAME, "crop_ids", crop_ids, shape=(b, n))
    dev = features.device
    if keep == n:
        return torch.arange(n, device=dev).expand(b, n).clone()
    features, cls_attention, crop_ids = detached(features), detached(cls_attention), detached(crop_ids)
    unknown = ~torch.isfinite(cls_attention.to(dev).float())  # these rank last inside their crop
    rows = []
    for r in range(b):  # rows may have different crops, so the (cheap, integer) allocation runs per row
        valid = None if valid_mask is None else valid_mask[r]
        plan = holov_plan(features[r], keep, cls_attention[r], valid=valid,
                          crop_ids=None if crop_ids is None else crop_ids[r], grid=grid,
                          crops=operator.index(crops), alpha=float(alpha))
        rank = cls_attention[r].to(dev).float() if within == "attention" else plan.score
        rank = rank.masked_fill(unknown[r], float("nan"))
        quota = torch.tensor(plan.quotas, dtype=torch.long, device=dev)
        rows.append(group_topk(rank, plan.crop, quota))
    return torch.stack(rows)


SPEC = SelectorSpec(
    name=NAME,
    fn=holov_select,
    requires=("cls_attention",),
    optional=("crop_ids", "grid"),
    options={"crops": 16, "alpha": 0.09, "within": "attention"},
    check_options=check_options,
    newlines="keep",
    description="HoloV (arXiv 2510.02912): budget split over crops (sub-images, grid tiles or sequence segments) by "
                "holistic crop score 1000·A + α·γ·V (attention + intra-crop similarity variance), top tokens per "
                "crop by attention; overflow redistributed so exactly keep tokens; ascending order.",
)
