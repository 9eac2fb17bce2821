"""PyramidDrop-style multi-stage schedule (CVPR'25, arXiv 2410.17247): at each stage boundary keep the top
``ratio × (the image's tokens entering the language model)`` visual tokens by the last instruction token's attention.

Default schedule: boundaries at 1/4, 1/2 and 3/4 of the depth with ratios 0.5, 0.25, 0.125 (LLaVA-1.5-7B:
layers 8/16/24; on a shallow model boundaries that land on one layer merge into one stage with the later ratio, see
:func:`vtprune.config.expand_schedule`). Deviation from the reference, on purpose: the score is the last token's
attention row in the layer just before each boundary (the same probe as FastV), not a re-projection with the next
layer's weights, so no projection runs outside the model's own attention.

Option ``schedule``: ``None`` (the default above) or a list of ``(layer: int ≥ 1, ratio in (0, 1])`` pairs with
strictly increasing layers and non-increasing ratios (checked by ``prune()``; layers past the model's last one are
refused once the model is known). Non-finite scores rank as in FastV (``NaN`` last, see
:func:`vtprune.selectors.base.topk_sorted`).
"""

from __future__ import annotations

from typing import Any

from .base import SelectorSpec, option_schedule
from .fastv import fastv_select


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming a bad ``schedule`` and the valid form."""
    if "schedule" in options:
        option_schedule("pdrop", "schedule", options["schedule"])


SPEC = SelectorSpec(name="pdrop", fn=fastv_select, requires=("text_attention",), stages=("llm",), text_guided=True,
                    options={"schedule": None}, schedule=((0.25, 0.5), (0.5, 0.25), (0.75, 0.125)),
                    check_options=check_options,
                    description="PyramidDrop-style schedule of last-token-attention stages")
