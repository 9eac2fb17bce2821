"""Adaptive per-layer, per-instance pruning — vtprune's training-free heuristic in the spirit of ATP-LLaVA
(CVPR'25, arXiv 2412.00447; no official code, learned thresholds not reproducible). **Not ATP-LLaVA.**

At each stage the kept count of an image is the smallest set of its visual tokens that holds ``mass`` of the
last prompt token's attention over them, clamped to [``min_keep``, the stage cap]. Caps follow a schedule (default
boundaries at 1/8, 7/16 and 3/4 of the depth — 4/14/24 of 32 layers — with caps 0.5, 0.25, 0.125 of the image's
tokens; on a shallow model boundaries that land on one layer merge, see :func:`vtprune.config.expand_schedule`), so
counts vary per instance and per stage and never increase.

Options: ``mass`` a number in (0, 1]; ``min_keep`` an int ≥ 1; ``schedule`` ``None`` (default) or a list of
``(layer: int ≥ 1, ratio in (0, 1])`` pairs, layers strictly increasing, ratios non-increasing.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, option_number, option_schedule

NAME = "atp"


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad option value and its valid range."""
    if "mass" in options:
        option_number(NAME, "mass", options["mass"], lo=0, hi=1, lo_open=True)
    if "min_keep" in options:
        option_number(NAME, "min_keep", options["min_keep"], lo=1, integer=True)
    if "schedule" in options:
        option_schedule(NAME, "schedule", options["schedule"])


def atp_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
               text_attention: torch.Tensor | None = None, mass: float = 0.9, min_keep: int = 1,
               **signals: Any) -> torch.Tensor:
    """features [B, N, D], text_attention [B, N] -> LongTensor[B, keep]: per row the kept indices ascending, then
    -1 padding (rows keep between ``min(min_keep, keep)`` and ``keep`` tokens).

    Non-finite attention (NaN, ±inf) carries no mass: such a token ranks after every valid token with a finite
    score, so it is kept only when ``min_keep`` (or the mass) needs more tokens than those. Tokens whose
    ``valid_mask`` is False rank after every valid token and are never kept (``keep`` ≤ the valid count).
    Features are not read (only their shape and device).
    """
    check_inputs(NAME, features, keep, valid_mask)
    check_signal(NAME, "text_attention", text_attention, tuple(features.shape[:2]))
    check_options({"mass": mass, "min_keep": min_keep})
    att = detached(text_attention).float()
    usable = torch.isfinite(att)
    # Tier 0: valid with a finite score; 1: valid, non-finite (no mass); 2: invalid (never kept).
    tier = (~usable).to(torch.uint8)
    if valid_mask is not None:
        vm = valid_mask.to(att.device)
        usable &= vm
        tier = tier.masked_fill(~vm, 2)
    p = torch.where(usable, att.clamp(min=0), 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
    by_p = torch.sort(p, dim=-1, descending=True, stable=True).indices
    # Stable sort by tier keeps the mass order inside each tier, ties to the lower index.
    order = by_p.gather(-1, torch.sort(tier.gather(-1, by_p), dim=-1, stable=True).indices)
    ranked = p.gather(-1, order)
    before = ranked.cumsum(-1) - ranked  # mass of the tokens ranked above each token
    count = (before < float(mass)).sum(-1).clamp(min=min(int(min_keep), keep), max=keep)
    n = p.shape[-1]
    rank = torch.arange(n, device=p.device)
    chosen = torch.where(rank[None, :keep] < count[:, None], order[:, :keep], n)
    chosen = chosen.sort(dim=-1).values
    return chosen.masked_fill(chosen == n, -1).to(features.device)


SPEC = SelectorSpec(name=NAME, fn=atp_select, requires=("text_attention",), stages=("llm",), text_guided=True,
                    options={"mass": 0.9, "min_keep": 1, "schedule": None}, adaptive=True,
                    schedule=((0.125, 0.5), (0.4375, 0.25), (0.75, 0.125)), check_options=check_options,
                    description="training-free adaptive counts from the attention mass (not ATP-LLaVA)")
