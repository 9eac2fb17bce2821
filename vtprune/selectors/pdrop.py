"""PyramidDrop-style multi-stage schedule (CVPR'25, arXiv 2410.17247): at each stage boundary keep the top
``ratio × (the image's tokens entering the language model)`` visual tokens by the last instruction token's attention.

Default schedule: boundaries at 1/4, 1/2 and 3/4 of the depth with ratios 0.5, 0.25, 0.125 (LLaVA-1.5-7B:
layers 8/16/24). Deviation from the reference, on purpose: the score is the last token's attention row in the
layer just before each boundary (the same probe as FastV), not a re-projection with the next layer's weights,
so no projection runs outside the model's own attention.
"""

from __future__ import annotations

from .base import SelectorSpec
from .fastv import fastv_select

SPEC = SelectorSpec(name="pdrop", fn=fastv_select, requires=("text_attention",), stages=("llm",), text_guided=True,
                    options={"schedule": None}, schedule=((0.25, 0.5), (0.5, 0.25), (0.75, 0.125)),
                    description="PyramidDrop-style schedule of last-token-attention stages")
