"""FastV (ECCV'24, arXiv 2403.06764): inside the language model, keep the visual tokens the last prompt token
attends to most in decoder layer K−1 (head mean); layers ≥ K see only the kept tokens. Implemented from the
paper's description; the score row comes from a probe on layer K−1's attention (no eager LLM, no re-run layer).

Non-finite scores rank as :func:`vtprune.selectors.base.topk_sorted` ranks them: ``+inf`` first, ``-inf`` after every
finite score, ``NaN`` after that; tokens whose ``valid_mask`` is False are never chosen. Features are not read.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, topk_sorted


def fastv_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
                 text_attention: torch.Tensor | None = None, **signals: Any) -> torch.Tensor:
    """features [B, N, D], text_attention [B, N] -> LongTensor[B, keep]: top-``keep`` by text attention, ascending."""
    check_inputs("fastv", features, keep, valid_mask)
    check_signal("fastv", "text_attention", text_attention, tuple(features.shape[:2]))
    return topk_sorted(detached(text_attention), keep, valid_mask).to(features.device)


SPEC = SelectorSpec(name="fastv", fn=fastv_select, requires=("text_attention",), stages=("llm",), text_guided=True,
                    default_layer=2, description="FastV: last prompt token's attention at layer K-1")
