"""One selection routine for every stage: images offered to a selector, batched where their shapes agree.

The ``pre_llm`` / vision stages (``adapters.base``) and the ``llm:K`` stages (``adapters.llm``) both hand their
images here as ``Offer``s; grouping, the per-image seed, the "nothing to drop" shortcut, merged tokens and the timing
share live in this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .registry import run_selector
from .report import Timer
from .selectors.base import SelectorSpec


def image_seed(seed: int, image: int) -> int:
    """The seed of a stochastic selector for the ``image``-th image of its sample (the same in every batch)."""
    return seed * 1_000_003 + image


@dataclass
class Offer:
    """One image's candidate tokens for a selector.

    ``features`` [n, D]; ``keep`` the image's budget; ``image`` its index in its sample (seeds); ``signals`` per-token
    signals already cut to the n candidates (any shape, stacked along a new batch axis); ``grid`` the candidates'
    layout for selectors that read it (offers with different grids are never batched together).
    """

    features: torch.Tensor
    keep: int
    image: int
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    grid: Any = None


@dataclass
class Choice:
    """What the selector kept of one offer: ``index`` LongTensor[k'] ascending into the offer's candidates, the
    ``merged`` tokens [k', D] to inject at those slots (merging selectors) or None, and the selector call's timer
    shared by ``share`` offers (None when nothing was selected)."""

    index: torch.Tensor
    merged: torch.Tensor | None = None
    timer: Timer | None = None
    share: int = 1


def select(spec: SelectorSpec, options: dict[str, Any], seed: int, offers: list[Offer]) -> list[Choice]:
    """Run ``spec`` over ``offers``: one batched call per group of equal (tokens, budget, grid)."""
    out: list[Choice | None] = [None] * len(offers)
    groups: dict[tuple, list[int]] = {}
    reads_grid = "grid" in spec.requires + spec.optional
    for i, o in enumerate(offers):
        n = o.features.shape[0]
        if o.keep >= n and not spec.adaptive:  # nothing to drop (an adaptive selector may still keep fewer)
            out[i] = Choice(torch.arange(n, device=o.features.device))
            continue
        shapes = tuple((k, tuple(v.shape)) for k, v in sorted(o.signals.items()))
        groups.setdefault((n, min(o.keep, n), repr(o.grid) if reads_grid else "", shapes), []).append(i)
    for (_, k, _, _), idxs in groups.items():
        first = offers[idxs[0]]
        signals: dict[str, Any] = {s: torch.stack([offers[i].signals[s] for i in idxs]) for s in first.signals}
        if "seed" in spec.requires + spec.optional:
            signals["seed"] = torch.tensor([image_seed(seed, offers[i].image) for i in idxs])
        if "grid" in spec.requires + spec.optional:
            signals["grid"] = first.grid
        feats = torch.stack([offers[i].features for i in idxs])
        timer = Timer(feats.device)
        with timer:
            sel = run_selector(spec, feats, k, **options, **signals)
        merged = None
        if isinstance(sel, tuple):  # merging selectors also return the tokens to inject at their slots
            sel, merged = sel
        for r, i in enumerate(idxs):
            valid = sel[r] >= 0  # adaptive selectors pad with -1
            out[i] = Choice(sel[r][valid], merged[r][valid] if merged is not None else None, timer, len(idxs))
    return out  # type: ignore[return-value]
