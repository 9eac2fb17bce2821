"""PyramidDrop-style multi-stage schedule (CVPR'25, arXiv 2410.17247): at each stage boundary keep the top
``ratio × (the image's tokens entering the language model)`` visual tokens by the last instruction token's attention.

Default schedule: boundaries at 1/4, 1/2 and 3/4 of the depth with ratios 0.5, 0.25, 0.125 (LLaVA-1.5-7B:
layers 8/16/24; on a shallow model boundaries that land on one layer merge into one stage with the later ratio, see
:func:`vtprune.config.expand_schedule`). As in the reference, a boundary at layer K is scored with layer K's *own*
input norm, q/k projections and RoPE applied to the hidden states entering it: the last prompt token's attention
over every token (softmax over all keys, causal), head mean, cut to the image (signal ``layer_attention``; the
adapter runs layer K's attention module up to its attention function and reads one query row there).

Option ``schedule``: ``None`` (the default above) or a list of ``(layer: int ≥ 1, ratio in (0, 1])`` pairs with
strictly increasing layers and non-increasing ratios (checked by ``prune()``; layers past the model's last one are
refused once the model is known). Non-finite scores rank as in FastV (``NaN`` last, see
:func:`vtprune.selectors.base.topk_sorted`).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, option_schedule, topk_sorted


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming a bad ``schedule`` and the valid form."""
    if "schedule" in options:
        option_schedule("pdrop", "schedule", options["schedule"])


def pdrop_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
                 layer_attention: torch.Tensor | None = None, **signals: Any) -> torch.Tensor:
    """features [B, N, D], layer_attention [B, N] -> LongTensor[B, keep]: top-``keep`` by the boundary layer's own
    last-token attention, ascending (ties to the lower index)."""
    check_inputs("pdrop", features, keep, valid_mask)
    check_signal("pdrop", "layer_attention", layer_attention, tuple(features.shape[:2]))
    return topk_sorted(detached(layer_attention), keep, valid_mask).to(features.device)


SPEC = SelectorSpec(name="pdrop", fn=pdrop_select, requires=("layer_attention",), stages=("llm",), text_guided=True,
                    options={"schedule": None}, schedule=((0.25, 0.5), (0.5, 0.25), (0.75, 0.125)),
                    check_options=check_options,
                    description="PyramidDrop: schedule of stages scored by each boundary layer's own last-token "
                                "attention")
