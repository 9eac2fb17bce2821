"""FasterVLM: keep the visual tokens the ViT [CLS] query attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning", arXiv 2412.01818. Reference:
``Theia-4869/FasterVLM@f5d5f12`` (Apache-2.0); the algorithm, the budget semantics and every difference from the
reference code are in ``docs/methods/fastervlm.md``. The adapter computes the signal (head-mean [CLS]->patch attention
*probabilities* of the projector's input ViT layer, CLS column dropped, not renormalised); this module only ranks it.

Two budgets (option ``budget``):

* ``"per_subimage"`` (default) — the reference's rule for multi-sub-image inputs (LLaVA-NeXT AnyRes: base image +
  crops): every sub-image keeps its own top ``T`` by its *own* [CLS] row, ranked over *all* the patches the ViT saw
  (the adapter's ``subimage_rank``), and tokens that a later layout step removed (LLaVA-NeXT's unpadding) are simply
  gone, so a crop may end with fewer than ``T``. ``keep`` stays a per-image budget: it is split evenly over the
  image's sub-images, ``T_s = keep // S`` plus one for the first ``keep % S`` sub-images (base first, then crops in
  grid raster order), ``S`` = 1 + the crop-grid cells (``crop_grid``; crops removed whole by unpadding still count,
  as in the reference). With ``keep = S·T`` this is exactly the reference's T per sub-image, the image never exceeds
  ``keep``, and it falls short only by what unpadding removed. Where the adapter gives no ``subimage_rank`` (one
  sub-image per image: LLaVA-1.5, Qwen, InternVL) it is the plain top-``keep``.
* ``"image"`` — one ranking over all the image's tokens, exactly ``keep`` kept (the single-budget variant).

Extra signals (per-sub-image budget only): ``crop_ids`` ``LongTensor[B, N]`` (0 = base image, ``1 + r·cols + c`` =
crop at grid cell (r, c)); ``subimage_rank`` ``LongTensor[B, N]`` (0-based rank of the token's [CLS] attention among
all patches of its sub-image before any of them was removed, ties to the lower patch index; distinct within a
sub-image); ``crop_grid`` ``LongTensor[B, N, 2]`` (the image's crop-grid (rows, cols) on every token, (0, 0) for no
crops; without it ``S`` = largest crop id + 1).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, option_choice, topk_sorted

NAME = "fastervlm"
BUDGETS = ("per_subimage", "image")


def _check_options(options: dict[str, Any]) -> None:
    if "budget" in options:
        option_choice(NAME, "budget", options["budget"], BUDGETS)


def _int_signal(name: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(f"{NAME}: signal {name!r} must be a tensor of shape {shape}, got {type(value).__name__}")
    check_signal(NAME, name, value, shape=shape)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{NAME}: signal {name!r} must be an integer tensor, got {value.dtype}")
    if bool((value < 0).any()):
        raise ValueError(f"{NAME}: signal {name!r} must hold values >= 0")
    return value


def subimage_budgets(keep: int, n_sub: torch.Tensor, width: int) -> torch.Tensor:
    """Tokens each sub-image may keep: ``keep`` split evenly over the ``n_sub`` sub-images of every row.

    Args:
        keep: the image's budget.
        n_sub: ``LongTensor[B]`` sub-images per row (>= 1).
        width: columns of the result (>= ``n_sub.max()``).

    Returns:
        ``LongTensor[B, width]``: ``keep // n_sub`` each, one more for the first ``keep % n_sub`` sub-images (base
        image first), 0 beyond ``n_sub``; every row sums to ``keep``.
    """
    s = torch.arange(width, device=n_sub.device)[None]
    share = keep // n_sub[:, None] + (s < (keep % n_sub)[:, None]).long()
    return torch.where(s < n_sub[:, None], share, torch.zeros_like(share))


def fastervlm_select(
    features: torch.Tensor,
    keep: int,
    *,
    valid_mask: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    crop_ids: torch.Tensor | None = None,
    subimage_rank: torch.Tensor | None = None,
    crop_grid: torch.Tensor | None = None,
    budget: str = "per_subimage",
    **signals: Any,
) -> torch.Tensor:
    """Top tokens by [CLS] attention, per row: per sub-image (default, where sub-images are described) or per image.

    Args:
        features: ``[B, N, D]`` visual tokens; only their shape and device are used.
        keep: the image's budget, ``1 <= keep <= N``.
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never chosen (per sub-image: their slots are not
            refilled, like tokens removed by unpadding).
        cls_attention: required ``FloatTensor[B, N]``, head-mean [CLS]->patch attention probabilities.
        crop_ids: ``LongTensor[B, N]`` sub-image of every token (needed with ``subimage_rank``).
        subimage_rank: optional ``LongTensor[B, N]``: rank of the token within its whole sub-image (module docstring).
        crop_grid: optional ``LongTensor[B, N, 2]``: the image's crop grid (rows, cols) on every token.
        budget: ``"per_subimage"`` or ``"image"`` (module docstring).
        **signals: other adapter signals, ignored.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending. ``"image"``: exactly ``keep`` per row, ties at the
        boundary to the lower index (scored in fp32, so bf16 inputs rank the same on every kernel). ``"per_subimage"``
        with ``subimage_rank``: the tokens whose rank is below their sub-image's share, ascending, then ``-1``
        padding where some were removed; ``keep == N`` keeps everything.
    """
    check_inputs(NAME, features, keep, valid_mask)
    option_choice(NAME, "budget", budget, BUDGETS)
    b, n, _ = features.shape
    if cls_attention is not None and not isinstance(cls_attention, torch.Tensor):
        raise ValueError(f"{NAME}: signal 'cls_attention' must be a tensor of shape {(b, n)}, "
                         f"got {type(cls_attention).__name__}")
    check_signal(NAME, "cls_attention", cls_attention, shape=(b, n))
    dev = features.device
    if budget == "image" or subimage_rank is None:
        if valid_mask is not None:
            valid_mask = valid_mask.to(cls_attention.device)
        return topk_sorted(cls_attention, keep, valid_mask).to(dev)
    if crop_ids is None:
        raise ValueError(f"{NAME}: budget='per_subimage' with 'subimage_rank' also needs the signal 'crop_ids' "
                         f"(which sub-image every token belongs to)")
    rank = _int_signal("subimage_rank", subimage_rank, (b, n)).to(dev)
    ids = _int_signal("crop_ids", crop_ids, (b, n)).to(dev)
    if keep == n:  # the identity contract: a budget covering every token keeps every token
        return torch.arange(n, device=dev).expand(b, n).clone()
    if crop_grid is not None:
        grid = _int_signal("crop_grid", crop_grid, (b, n, 2)).to(dev)
        if bool((grid != grid[:, :1]).any()):
            raise ValueError(f"{NAME}: signal 'crop_grid' must hold one (rows, cols) per row (the image's crop grid)")
        n_sub = 1 + grid[:, 0, 0] * grid[:, 0, 1]
        if bool((ids >= n_sub[:, None]).any()):
            raise ValueError(f"{NAME}: 'crop_ids' exceed the crop grid: ids must be < 1 + rows·cols")
    else:
        n_sub = ids.max(1).values + 1
    share = subimage_budgets(keep, n_sub, int(n_sub.max()))  # [B, S]; the one host read of the call
    kept = rank < share.gather(1, ids)
    if valid_mask is not None:
        kept &= valid_mask.to(dev)
    if bool((kept.sum(1) > keep).any()):
        raise ValueError(f"{NAME}: signal 'subimage_rank' must be distinct within each sub-image (more than keep="
                         f"{keep} tokens ranked inside their sub-image's share)")
    pos = torch.arange(n, device=dev).expand(b, n)
    out = torch.where(kept, pos, n).sort(dim=1).values[:, :keep]  # kept ascending, then the sentinel n
    return out.masked_fill(out == n, -1)


SPEC = SelectorSpec(
    name=NAME,
    fn=fastervlm_select,
    requires=("cls_attention",),
    optional=("crop_ids", "subimage_rank", "crop_grid"),
    options={"budget": "per_subimage"},
    newlines="keep",
    description="FasterVLM (arXiv 2412.01818): keep the top visual tokens by head-mean [CLS]->patch attention "
                "of the ViT layer feeding the projector; multi-sub-image inputs (LLaVA-NeXT) rank every sub-image "
                "on its own with keep split evenly over them, then unpad (budget='per_subimage', the reference; "
                "budget='image' ranks the whole image at once); text-agnostic, ascending order.",
    check_options=_check_options,
)
