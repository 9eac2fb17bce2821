"""FasterVLM: keep the visual tokens the ViT [CLS] query attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning", arXiv 2412.01818.
The adapter computes the signal (head-mean [CLS]->patch attention *probabilities* of the projector's input ViT
layer, CLS column dropped, not renormalised); this module only ranks it.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, topk_sorted

NAME = "fastervlm"


def fastervlm_select(
    features: torch.Tensor,
    keep: int,
    *,
    valid_mask: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    **signals: Any,
) -> torch.Tensor:
    """Top-``keep`` tokens by [CLS] attention, per row.

    Args:
        features: ``[B, N, D]`` visual tokens; only their shape and device are used.
        keep: tokens to keep per row, ``1 <= keep <= N``.
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never chosen.
        cls_attention: required ``FloatTensor[B, N]``, head-mean [CLS]->patch attention probabilities.
        **signals: other adapter signals, ignored.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending; ties at the boundary go to the lower index
        (scored in fp32, so bf16 inputs rank the same on every kernel).
    """
    check_inputs(NAME, features, keep, valid_mask)
    b, n, _ = features.shape
    if cls_attention is not None and not isinstance(cls_attention, torch.Tensor):
        raise ValueError(f"{NAME}: signal 'cls_attention' must be a tensor of shape {(b, n)}, "
                         f"got {type(cls_attention).__name__}")
    check_signal(NAME, "cls_attention", cls_attention, shape=(b, n))
    if valid_mask is not None:
        valid_mask = valid_mask.to(cls_attention.device)
    return topk_sorted(cls_attention, keep, valid_mask).to(features.device)


SPEC = SelectorSpec(
    name=NAME,
    fn=fastervlm_select,
    requires=("cls_attention",),
    newlines="keep",
    description="FasterVLM (arXiv 2412.01818): keep the top-k visual tokens by head-mean [CLS]->patch attention "
                "of the ViT layer feeding the projector; text-agnostic, ascending order.",
)
