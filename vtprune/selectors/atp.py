"""Adaptive per-layer, per-instance pruning — vtprune's training-free heuristic in the spirit of ATP-LLaVA
(CVPR'25, arXiv 2412.00447; no official code, learned thresholds not reproducible). **Not ATP-LLaVA.**

At each stage the kept count of an image is the smallest set of its visual tokens that holds ``mass`` of the
last prompt token's attention over them, clamped to [``min_keep``, the stage cap]. Caps follow a schedule (default
boundaries at 1/8, 7/16 and 3/4 of the depth — 4/14/24 of 32 layers — with caps 0.5, 0.25, 0.125 of the image's
tokens), so counts vary per instance and per stage and never increase.
"""

from __future__ import annotations

import torch

from .base import SelectorSpec, check_inputs, check_signal


def atp_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
               text_attention: torch.Tensor | None = None, mass: float = 0.9, min_keep: int = 1,
               **signals) -> torch.Tensor:
    """features [B, N, D], text_attention [B, N] -> LongTensor[B, keep]: per row the kept indices ascending, then
    -1 padding (rows keep between ``min_keep`` and ``keep`` tokens)."""
    check_inputs("atp", features, keep, valid_mask)
    check_signal("atp", "text_attention", text_attention, tuple(features.shape[:2]))
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"atp: mass must be in (0, 1], got {mass!r}")
    s = text_attention.float().clamp(min=0)
    if valid_mask is not None:
        s = s.masked_fill(~valid_mask, 0.0)
    p = s / s.sum(-1, keepdim=True).clamp(min=1e-12)
    order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = order.values.cumsum(-1) - order.values  # mass of the tokens ranked above each token
    count = (before < float(mass)).sum(-1).clamp(min=min(int(min_keep), keep), max=keep)
    rank = torch.arange(p.shape[-1], device=p.device)
    chosen = torch.where(rank[None, :keep] < count[:, None], order.indices[:, :keep], p.shape[-1])
    chosen = chosen.sort(dim=-1).values
    return chosen.masked_fill(chosen == p.shape[-1], -1).to(features.device)


SPEC = SelectorSpec(name="atp", fn=atp_select, requires=("text_attention",), stages=("llm",), text_guided=True,
                    options={"mass": 0.9, "min_keep": 1, "schedule": None}, adaptive=True,
                    schedule=((0.125, 0.5), (0.4375, 0.25), (0.75, 0.125)),
                    description="training-free adaptive counts from the attention mass (not ATP-LLaVA)")
