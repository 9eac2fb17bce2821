"""GlobalCom²: thumbnail-commanded crop budgets for multi-crop (AnyRes) inputs, implemented from SELECTORS.md §6.4.

Paper: "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration" (later
"Global Compression Commander"), arXiv 2501.05179. Reference: ``xuyang-liu16/GlobalCom2@96b2d00`` (Apache-2.0); the
algorithm, the reference's bugs not reproduced and every difference from the reference code are in
``docs/methods/globalcom2.md``. The thumbnail (base image) sees the whole picture, so its [CLS] logits *command* the
crops: (1) a crop covering more thumbnail signal gets a larger retention ratio, ``r_c = r·(1 + p_c − 1/C)`` with
``p = softmax(S/τ)`` over the crops' thumbnail mass ``S``; (2) every crop token is scored by its crop's own [CLS]
logit plus the thumbnail logit map sampled at its position, each L2-normalised over the crop. The thumbnail itself
keeps its ``round(r·N_0)`` highest-logit tokens. Text-agnostic.

Signals: ``crop_ids`` (0 = thumbnail, 1..C = crops), ``cls_logits`` (head-mean *pre-softmax* [CLS] logits of the
last ViT layer, one per token), ``coords`` (patch-centre (y, x) of every token in the whole image, in [0, 1): the
unpadded geometry, which places the global prior) and, optionally, ``crop_grid`` (the image's crop grid (rows, cols)
on every token, crop id = 1 + r·cols + c).

Geometry, as in the reference: the crop ratios lay the thumbnail grid over the *padded* crop grid in whole blocks
(:func:`reference_regions`; every grid cell is a crop, also one that unpadding removed whole), while the global prior
interpolates the thumbnail over the *unpadded* crop map (:func:`crop_token_scores`). Without ``crop_grid`` (a
standalone call on a layout that has none) the ratios fall back to regions derived from the crops' coordinates
(:func:`crop_regions`).

Deliberate differences from the reference:

* **Exact budget.** The reference floors every crop's ``N_c·r_c``, so it keeps fewer tokens than asked (and the
  mean-ratio identity breaks when a ratio clips at 1); here the per-part counts are fixed up to exactly ``keep``
  (see :func:`globalcom2_quotas`), with ``r = keep / N``.
* **Order.** The reference emits the thumbnail tokens in descending-score order, crops in stitched raster order;
  vtprune returns ascending indices (``order="sorted"``); the kept set is the same.
* **Newlines** are the adapter's business (``newlines="keep"``: layout tokens are kept and not counted), so the
  reference's one newline per *padded* stitched row is not part of the budget; the model's own layout (one per
  unpadded row) is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .base import SelectorSpec, check_inputs, check_signal, detached
from .holov import group_topk

NAME = "globalcom2"


# ---------------------------------------------------------------------------------------------------------- geometry


def _thumbnail_grid(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover the thumbnail's regular ``h0 × w0`` grid from its token coords ``points [N0, 2]`` (CPU float64).

    Returns ``(row [N0], col [N0], ys [h0], xs [w0])``: each token's grid cell and the distinct centre coordinates.
    Raises ValueError unless every cell of the grid holds exactly one token.
    """
    ys, row = torch.unique(points[:, 0], return_inverse=True)
    xs, col = torch.unique(points[:, 1], return_inverse=True)
    h0, w0, n0 = ys.numel(), xs.numel(), points.shape[0]
    if h0 * w0 != n0 or not bool((torch.bincount(row * w0 + col, minlength=n0) == 1).all()):
        raise ValueError(f"{NAME}: the thumbnail's {n0} token coords do not form a regular grid "
                         f"({h0} distinct y × {w0} distinct x values)")
    return row, col, ys, xs


def _spacing(values: torch.Tensor) -> float | None:
    """Lattice step of sorted distinct values (None for a single value)."""
    return float(values[-1] - values[0]) / (values.numel() - 1) if values.numel() > 1 else None


def crop_regions(points: list[torch.Tensor], fallback: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-open image regions ``[lo, hi)`` of the crops, from their token coords.

    Args:
        points: per crop, ``[N_c, 2]`` (y, x) token centres (CPU float64).
        fallback: (y, x) cell size used when no crop has two distinct values on that axis (the thumbnail cell).

    Returns:
        ``lo, hi``: ``[C, 2]``. A crop's region is the bounding box of its token centres expanded by half of *its own*
        cell on each side (the cell is the lattice step of its distinct centres; for a crop one token thick on an
        axis, the smallest step of the other crops, else ``fallback``). When the crops tile the image this is
        exactly each crop's extent, so regions meet without gaps or overlap. (Expanding by half a *thumbnail* cell
        instead would make neighbouring regions overlap by a thumbnail cell minus a crop cell, counting some
        thumbnail tokens twice once the crop edges are not aligned with the thumbnail grid, e.g. after unpadding.)
    """
    distinct = [[torch.unique(p[:, a]) for a in (0, 1)] for p in points]
    steps = [[_spacing(d[a]) for a in (0, 1)] for d in distinct]
    default = []
    for a in (0, 1):
        known = [s[a] for s in steps if s[a] is not None and s[a] > 0]
        default.append(min(known) if known else fallback[a])
    lo = torch.empty(len(points), 2, dtype=torch.float64)
    hi = torch.empty(len(points), 2, dtype=torch.float64)
    for c, (d, s) in enumerate(zip(distinct, steps)):
        for a in (0, 1):
            half = 0.5 * (s[a] if s[a] is not None and s[a] > 0 else default[a])
            lo[c, a], hi[c, a] = float(d[a][0]) - half, float(d[a][-1]) + half
    return lo, hi


def assign_to_regions(points: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Index of the region each point ``[P, 2]`` falls into: exactly one per point.

    A point inside ``[lo, hi)`` of several regions goes to the first of them; a point inside none (crops that do
    not cover the image) to the region nearest to it (Euclidean distance to the box), ties to the first.
    """
    p = points[:, None, :]
    inside = ((p >= lo[None]) & (p < hi[None])).all(-1)  # [P, C]
    gap = ((lo[None] - p).clamp(min=0) + (p - hi[None]).clamp(min=0)).norm(dim=-1)
    return torch.where(inside, -1.0, gap).argmin(-1)  # argmin returns the first minimum: ties to the lower crop


# ------------------------------------------------------------------------------------------------------------ budget


@dataclass(frozen=True)
class CropRatios:
    """One row's thumbnail-commanded crop ratios.

    ``ids``: crop ids (ascending, thumbnail id 0 excluded); ``assign``: ``LongTensor[N0]`` position in ``ids`` of
    the crop each thumbnail token falls into (thumbnail tokens in index order); ``mass``: ``S_c``, the sum of the
    thumbnail logits assigned to crop c; ``probs``: ``p = softmax((S − max S)/τ)``; ``ratios``:
    ``r_c = clip(r·(1 + p_c − 1/C), 0, 1)``. All ``[C]`` float64 on the CPU.
    """

    ids: list[int]
    assign: torch.Tensor
    mass: torch.Tensor
    probs: torch.Tensor
    ratios: torch.Tensor


def _check_tau(tau: Any) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
        raise ValueError(f"{NAME}: option tau must be a number > 0, got {tau!r}")


def _check_options(options: dict[str, Any]) -> None:
    """``prune()``-time check of the user's options (the same rule the selector applies per call)."""
    if "tau" in options:
        _check_tau(options["tau"])


def _no_crops_error() -> ValueError:
    return ValueError(f"{NAME} needs a multi-crop input (LLaVA-NeXT AnyRes base + crops): a thumbnail "
                      f"(crop_ids == 0) plus at least one crop (crop_ids >= 1); this image has no crops. For a "
                      f"single image use holov or fastervlm.")


def reference_regions(row: torch.Tensor, col: torch.Tensor, h0: int, w0: int, rows: int, cols: int) -> torch.Tensor:
    """Crop-grid cell of every thumbnail token under the reference's block rule (``generate_scale_for_crop_features``).

    The thumbnail's ``h0 × w0`` grid is laid over the *padded* ``rows × cols`` crop grid (the canvas the crops were cut
    from) in whole blocks of ``max(h0 // rows, 1)`` rows and ``max(w0 // cols, 1)`` columns; the last block row / column
    also takes the remainder (indices clipped to the grid). So a crop that unpadding shrank or removed still counts the
    thumbnail mass of its full block.

    Args:
        row, col: ``LongTensor[N0]`` grid cell of every thumbnail token.
        h0, w0: thumbnail grid size; ``rows``, ``cols``: crop grid size (>= 1).

    Returns:
        ``LongTensor[N0]``: index ``r·cols + c`` of the crop cell (crop id minus one).
    """
    r = torch.clamp(row // max(h0 // rows, 1), max=rows - 1)
    c = torch.clamp(col // max(w0 // cols, 1), max=cols - 1)
    return r * cols + c


def _grid_of(crop_grid: torch.Tensor, ids_cpu: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) from a row's ``crop_grid [N, 2]``: one value for the whole image, covering every crop id."""
    g = crop_grid.detach().cpu()
    if g.dtype.is_floating_point or g.dtype == torch.bool or bool((g != g[:1]).any()):
        raise ValueError(f"{NAME}: signal 'crop_grid' must be an integer tensor holding the image's crop grid "
                         f"(rows, cols) on every token, got {g.dtype} / several values")
    rows, cols = int(g[0, 0]), int(g[0, 1])
    if rows < 1 or cols < 1 or int(ids_cpu.max()) > rows * cols:
        raise ValueError(f"{NAME}: crop grid ({rows}, {cols}) does not hold crop ids up to {int(ids_cpu.max())} "
                         f"(crop id = 1 + r·cols + c)")
    return rows, cols


def globalcom2_crop_ratios(
    cls_logits: torch.Tensor,
    coords: torch.Tensor,
    crop_ids: torch.Tensor,
    ratio: float,
    *,
    tau: float = 10.0,
    crop_grid: torch.Tensor | None = None,
) -> CropRatios:
    """Retention ratio of every crop of one row, from the thumbnail logits that fall on its region.

    Args:
        cls_logits: ``[N]`` head-mean [CLS] logits of every token.
        coords: ``[N, 2]`` (y, x) patch centres in the whole image, in [0, 1).
        crop_ids: ``LongTensor[N]``: 0 = thumbnail, 1..C = crops (with ``crop_grid``: ``1 + r·cols + c``).
        ratio: the overall retention ratio ``r``.
        tau: softmax temperature (∞ gives ``r_c = r`` for every crop).
        crop_grid: optional ``LongTensor[N, 2]``, the image's crop grid (rows, cols) on every token.

    Returns:
        :class:`CropRatios`. With ``crop_grid`` (LLaVA-NeXT): the reference's geometry — every cell of the grid is a
        crop (ids ``1..rows·cols``, also those unpadding removed whole, which keep 0 tokens but still enter the
        softmax and ``1/C``) and thumbnail token t counts for the cell of :func:`reference_regions`. Without it:
        the crops present, thumbnail token t counting for the crop whose region (:func:`crop_regions`) contains its
        centre (:func:`assign_to_regions`). Without clipping ``Σ_c r_c = C·r``.
    """
    _check_tau(tau)
    ids_cpu = crop_ids.detach().cpu()
    pts = coords.detach().cpu().double()  # geometry is tiny: one copy to the host per row, float64 throughout
    logits = cls_logits.detach().cpu().double()
    thumb = ids_cpu == 0
    if not bool(thumb.any()):
        raise ValueError(f"{NAME}: no thumbnail tokens (crop_ids == 0) in this image; the thumbnail commands the "
                         f"crop budgets")
    if not bool((~thumb).any()):
        raise _no_crops_error()
    row, col, ys, xs = _thumbnail_grid(pts[thumb])
    if crop_grid is not None:
        rows, cols = _grid_of(crop_grid, ids_cpu)
        ids = list(range(1, rows * cols + 1))
        assign = reference_regions(row, col, ys.numel(), xs.numel(), rows, cols)
    else:
        ids = torch.unique(ids_cpu[~thumb]).tolist()
        cell = (_spacing(ys) or 1.0, _spacing(xs) or 1.0)  # a one-row thumbnail spans the whole height
        lo, hi = crop_regions([pts[ids_cpu == c] for c in ids], cell)
        assign = assign_to_regions(pts[thumb], lo, hi)
    mass = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, assign, logits[thumb])
    if math.isinf(tau):
        probs = torch.full_like(mass, 1.0 / len(ids))
    else:
        probs = torch.softmax((mass - mass.max()) / tau, dim=0)
    ratios = (ratio * (1 + probs - 1 / len(ids))).clamp(0.0, 1.0)
    return CropRatios(ids=ids, assign=assign, mass=mass, probs=probs, ratios=ratios)


def globalcom2_quotas(thumb_size: int, crop_sizes: list[int], ratio: float, crop_ratios: list[float],
                      keep: int) -> list[int]:
    """Tokens kept by the thumbnail and by every crop, summing to exactly ``keep``.

    Args:
        thumb_size: (valid) thumbnail tokens ``N_0``.
        crop_sizes: (valid) tokens ``N_c`` of every crop.
        ratio: overall retention ratio ``r``.
        crop_ratios: ``r_c`` of every crop.
        keep: total budget, ``<= thumb_size + sum(crop_sizes)``.

    Returns:
        ``[q_0, q_1, ..., q_C]``, thumbnail first. Start from the reference counts: ``q_0 = round(r·N_0)`` (half up)
        and ``q_c = floor(N_c·r_c)``. Their sum generally misses ``keep`` (flooring; ratios clipped at 1; crops of
        different sizes), which the reference leaves as it is; here units are then moved one at a time: while short,
        to the part with the largest remainder ``target − q`` that still has room (targets ``r·N_0`` and
        ``N_c·r_c``); while over, from the part with the smallest remainder that still keeps a token; ties to the
        earlier part (thumbnail first). No part ever exceeds its size.
    """
    sizes = [thumb_size, *crop_sizes]
    if keep < 0 or keep > sum(sizes):
        raise ValueError(f"{NAME}: budget {keep} outside [0, {sum(sizes)}] (total tokens)")
    target = [ratio * thumb_size] + [n * float(rc) for n, rc in zip(crop_sizes, crop_ratios)]
    q = [min(math.floor(target[0] + 0.5), thumb_size)] + [min(math.floor(t), n) for t, n in zip(target[1:], crop_sizes)]
    q = [max(x, 0) for x in q]
    parts = range(len(sizes))
    while sum(q) < keep:
        i = max((p for p in parts if q[p] < sizes[p]), key=lambda p: (target[p] - q[p], -p))
        q[i] += 1
    while sum(q) > keep:
        i = min((p for p in parts if q[p] > 0), key=lambda p: (target[p] - q[p], p))
        q[i] -= 1
    return q


# ------------------------------------------------------------------------------------------------------------ scores


def crop_token_scores(cls_logits: torch.Tensor, coords: torch.Tensor, crop_ids: torch.Tensor, ids: list[int],
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """GlobalCom² score ``[N]`` (fp32) of one row: the raw logit for thumbnail tokens, local + global for crop tokens.

    ``local``: the crop's own logits, L2-normalised over the crop's (valid) tokens. ``global``: the thumbnail logit
    map (``h0 × w0``, rebuilt from the thumbnail tokens' coords) bilinearly sampled at the crop tokens' coords with
    ``grid_sample(align_corners=False, padding_mode="border")`` (a thumbnail cell centre maps to its pixel centre;
    beyond the outermost centres the edge value holds, like the reference's bilinear upsampling), also
    L2-normalised over the crop. Invalid tokens get 0 (they are never ranked).
    """
    dev = cls_logits.device
    logits = cls_logits.float()
    ids_cpu = crop_ids.detach().cpu()
    thumb = ids_cpu == 0
    pts = coords.detach().cpu().double()
    row, col, ys, xs = _thumbnail_grid(pts[thumb])
    h0, w0 = ys.numel(), xs.numel()
    flat = (row * w0 + col).to(dev)
    tmap = torch.empty(h0 * w0, dtype=torch.float32, device=dev).scatter_(0, flat, logits[thumb.to(dev)])
    crop_tok = ~thumb

    def norm_axis(u: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        # grid_sample (align_corners=False) puts pixel j's centre at (2j + 1)/size − 1; map the thumbnail's centre
        # coordinates affinely onto those.
        size = centres.numel()
        step = _spacing(centres) or 1.0
        return ((u - float(centres[0])) / step + 0.5) * 2 / size - 1

    q = pts[crop_tok]
    grid = torch.stack([norm_axis(q[:, 1], xs), norm_axis(q[:, 0], ys)], -1).float().to(dev)
    sampled = F.grid_sample(tmap.view(1, 1, h0, w0), grid.view(1, 1, -1, 2), mode="bilinear",
                            padding_mode="border", align_corners=False).view(-1)
    glob = torch.zeros_like(logits)
    glob[crop_tok.to(dev)] = sampled
    ok = torch.ones_like(thumb) if valid is None else valid.detach().cpu()
    score = torch.where(thumb.to(dev), logits, torch.zeros_like(logits))
    for c in ids:
        idx = ((ids_cpu == c) & ok).nonzero().flatten().to(dev)
        if idx.numel() == 0:
            continue
        loc, glo = logits[idx], glob[idx]
        score[idx] = loc / loc.norm().clamp_min(1e-12) + glo / glo.norm().clamp_min(1e-12)
    return score


# ---------------------------------------------------------------------------------------------------------- selector


def globalcom2_select(
    features: torch.Tensor,
    keep: int,
    *,
    valid_mask: torch.Tensor | None = None,
    crop_ids: torch.Tensor | None = None,
    cls_logits: torch.Tensor | None = None,
    coords: torch.Tensor | None = None,
    crop_grid: torch.Tensor | None = None,
    tau: float = 10.0,
    **signals: Any,
) -> torch.Tensor:
    """GlobalCom²: thumbnail top-k plus thumbnail-guided crop budgets and scores.

    Args:
        features: ``[B, N, D]`` visual tokens of one multi-crop image per row; only shape and device are used.
        keep: total tokens to keep per row (thumbnail + crops), ``1 <= keep <= N``; ``r = keep / N`` (valid tokens).
        valid_mask: optional ``BoolTensor[B, N]``: False tokens are never chosen and not counted in ``N``, ``N_0``,
            ``N_c``; the thumbnail map and the crop regions still use every token's logits and coords.
        crop_ids: required ``LongTensor[B, N]``: 0 = thumbnail (base image), 1..C = crops.
        cls_logits: required ``FloatTensor[B, N]``: head-mean pre-softmax [CLS] logits of the last ViT layer.
        coords: required ``FloatTensor[B, N, 2]``: (y, x) patch centres in the whole image, in [0, 1); the
            thumbnail's tokens must form a regular grid.
        crop_grid: optional ``LongTensor[B, N, 2]``: the image's crop grid (rows, cols) on every token; with it the
            crop ratios follow the reference's padded-grid geometry (:func:`globalcom2_crop_ratios`).
        tau: softmax temperature of the crop ratios (default 10).
        **signals: other adapter signals, ignored.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending (the reference's descending-score thumbnail order
        is not reproduced): the thumbnail's top tokens by logit and every crop's top tokens by local + global score,
        ties to the lower index, with counts from :func:`globalcom2_quotas` (exactly ``keep``; the reference's
        flooring shortfall is corrected).

    Raises:
        ValueError: a signal is missing or malformed, or a row has no crop (single-image input).
    """
    check_inputs(NAME, features, keep, valid_mask)
    _check_tau(tau)
    b, n, _ = features.shape
    for name, value, shape in (("crop_ids", crop_ids, (b, n)), ("cls_logits", cls_logits, (b, n)),
                               ("coords", coords, (b, n, 2))):
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{NAME}: signal {name!r} must be a tensor of shape {shape}, got {type(value).__name__}")
        check_signal(NAME, name, value, shape=shape)
    if crop_ids.dtype.is_floating_point or crop_ids.dtype == torch.bool or bool((crop_ids < 0).any()):
        raise ValueError(f"{NAME}: signal 'crop_ids' must hold integer ids >= 0 (0 = thumbnail), "
                         f"got {crop_ids.dtype}")
    if not coords.dtype.is_floating_point:
        raise ValueError(f"{NAME}: signal 'coords' must be a float tensor, got {coords.dtype}")
    if not bool(torch.isfinite(coords).all()):  # patch centres come from the layout, never from pixel values
        raise ValueError(f"{NAME}: signal 'coords' must be finite (patch centres in [0, 1)), got non-finite values")
    if crop_grid is not None and (not isinstance(crop_grid, torch.Tensor) or tuple(crop_grid.shape) != (b, n, 2)):
        shape = tuple(crop_grid.shape) if isinstance(crop_grid, torch.Tensor) else type(crop_grid).__name__
        raise ValueError(f"{NAME}: signal 'crop_grid' must be a tensor of shape {(b, n, 2)}, got {shape}")
    dev = features.device
    if keep == n:
        return torch.arange(n, device=dev).expand(b, n).clone()
    # Non-finite logits are "unknown": for the crop masses and the thumbnail map they take the row's lowest finite
    # logit (no signal there), and such tokens rank after every finite one in their group (NaN score).
    raw = detached(cls_logits).float()
    known = torch.isfinite(raw)
    floor = raw.masked_fill(~known, float("inf")).amin(-1, keepdim=True)
    logits = torch.where(known, raw, torch.where(torch.isfinite(floor), floor, 0.0))
    rows = []
    for r in range(b):  # crop layouts differ per image; the geometry and the integer budget are per row anyway
        ids_r = crop_ids[r].to(dev)
        valid = torch.ones(n, dtype=torch.bool, device=dev) if valid_mask is None else valid_mask[r].to(dev)
        if not bool((ids_r != 0).any()):
            raise _no_crops_error()
        n_valid = int(valid.sum())
        ratio = keep / n_valid
        cr = globalcom2_crop_ratios(logits[r], coords[r], ids_r, ratio, tau=tau,
                                    crop_grid=None if crop_grid is None else crop_grid[r])
        counts = torch.bincount(ids_r[valid], minlength=max(cr.ids) + 1).tolist()
        quotas = globalcom2_quotas(counts[0], [counts[c] for c in cr.ids], ratio, cr.ratios.tolist(), keep)
        score = crop_token_scores(logits[r].to(dev), coords[r], ids_r, cr.ids, valid)
        score = score.masked_fill(~known[r].to(dev), float("nan"))
        # group 0 = thumbnail, group k + 1 = k-th crop id; invalid tokens -1 (never kept)
        lookup = torch.full((max(cr.ids) + 1,), -1, dtype=torch.long, device=dev)
        lookup[0] = 0
        lookup[torch.tensor(cr.ids, device=dev)] = torch.arange(1, len(cr.ids) + 1, device=dev)
        group = torch.where(valid, lookup[ids_r], -1)
        rows.append(group_topk(score, group, torch.tensor(quotas, dtype=torch.long, device=dev)))
    return torch.stack(rows)


SPEC = SelectorSpec(
    name=NAME,
    fn=globalcom2_select,
    requires=("crop_ids", "cls_logits", "coords"),
    optional=("crop_grid",),
    options={"tau": 10.0},
    check_options=_check_options,
    newlines="keep",
    description="GlobalCom² (arXiv 2501.05179): multi-crop (AnyRes) inputs only; the thumbnail keeps its top "
                "round(r·N0) tokens by [CLS] logit and sets each crop's ratio r·(1 + p_c − 1/C) from the thumbnail "
                "logit mass on its region (p = softmax(S/τ)); crop tokens ranked by local + thumbnail-sampled "
                "logits; budget made exact; ascending order.",
)
