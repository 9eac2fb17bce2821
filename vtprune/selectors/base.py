"""Selector contract shared by every method.

A selector is a pure function over tensors:

    fn(features: Tensor[B, N, D], keep: int, *, valid_mask: BoolTensor[B, N] | None, **signals)
        -> LongTensor[B, keep]   (ascending, unique, in range, exactly ``keep`` per row)

It knows nothing about model families. It declares the signals it ``requires`` so an adapter computes only
those, and the options a user may pass through ``vtprune.prune(..., **options)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Signals an adapter may provide. Shapes are per call of a selector (B rows = B images).
SIGNALS: dict[str, str] = {
    "cls_attention": "FloatTensor[B, N]: head-mean [CLS]->token attention probabilities",
    "text_features": "FloatTensor[B, T, D]: prompt text embeddings",
    "text_attention": "FloatTensor[B, N]: attention of prompt token(s) over the visual tokens",
    "grid": "tuple (h, w) or list of (h, w) segments covering the N tokens in raster order",
    "crop_ids": "LongTensor[B, N]: sub-image id of every token",
    "seed": "int or LongTensor[B]: per-row seed for stochastic selectors",
    "cls_logits": "FloatTensor[B, N]: head-mean pre-softmax [CLS] logits of the last ViT layer",
    "coords": "FloatTensor[B, N, 2]: each token's patch-centre (y, x) in the whole image, in [0, 1)",
    "vflow_importance": "FloatTensor[B, N]: attention received from the image's global tokens (VFlowOpt)",
    "flow_stats": "FloatTensor[B, 3, N]: [CLS] attention, [CLS]-value softmax and value L1 norm (FlowCut)",
}


@dataclass(frozen=True)
class SelectorSpec:
    """What a selector is and what it needs.

    ``newlines``: how an adapter treats layout-only tokens such as LLaVA-NeXT's ``image_newline``:
    ``"keep"`` = always kept and not counted in the budget (FasterVLM reference behaviour),
    ``"pool"`` = offered to the selector like any other token and counted (DivPrune reference behaviour).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # user options with defaults
    stages: tuple[str, ...] = ("pre_llm",)  # "pre_llm" and/or "llm" (between decoder layers)
    text_guided: bool = False
    newlines: str = "keep"
    description: str = ""
    #: layer used when an llm-only method is given without ``layer`` (FastV: 2)
    default_layer: int | None = None
    #: multi-stage default: ((fraction of LLM depth, keep ratio of the image's tokens), ...); expanded at prune time
    schedule: tuple[tuple[float, float], ...] = ()
    #: keeps a per-instance number of tokens (≤ keep); padded with -1 in the returned indices
    adaptive: bool = False
    #: ``check_options(options)`` raises ValueError naming a bad option value and its valid range; called by
    #: ``prune()`` with the options the user gave, so a bad value fails before the model is touched
    check_options: Callable[[dict[str, Any]], None] | None = None


def option_number(method: str, name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is a real number (an int if ``integer``) inside the given range.

    The message names the method, the option, the bad value and the valid range, e.g.
    ``atp: option mass must be a number in (0, 1], got -1``.
    """
    kind = "an int" if integer else "a number"
    rng = ""
    if lo is not None or hi is not None:
        rng = (f" in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
               f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(float(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ValueError(f"{method}: option {name} must be {kind}{rng}, got {value!r}")


def option_choice(method: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (the message lists them)."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{method}: option {name} must be one of {', '.join(repr(c) for c in choices)}, "
                         f"got {value!r}")


def check_inputs(name: str, features: torch.Tensor, keep: int, valid_mask: torch.Tensor | None) -> None:
    """Validate the common selector inputs; raise ValueError naming the bad value."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name}: features must be a tensor of shape [B, N, D] (rank 3), got {shape}")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"{name}: keep must be an int, got {keep!r} ({type(keep).__name__})")
    b, n, _ = features.shape
    if keep < 1 or keep > n:
        raise ValueError(f"{name}: keep must be in [1, N={n}], got {keep}")
    if valid_mask is not None:
        if valid_mask.shape != (b, n) or valid_mask.dtype != torch.bool:
            raise ValueError(f"{name}: valid_mask must be a bool tensor of shape {(b, n)}, got "
                             f"{tuple(valid_mask.shape)} {valid_mask.dtype}")
        short = valid_mask.sum(1) < keep
        if bool(short.any()):
            raise ValueError(f"{name}: keep={keep} exceeds the valid token count of rows "
                             f"{short.nonzero().flatten().tolist()}")


def check_signal(name: str, signal: str, value: Any, shape: tuple[int, ...] | None = None) -> None:
    """Raise a clear error when a required signal is missing or malformed."""
    if value is None:
        raise ValueError(f"{name} requires the signal {signal!r} ({SIGNALS.get(signal, '')}); it was not given")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name}: signal {signal!r} must have shape {shape}, got {tuple(value.shape)}")


def topk_sorted(score: torch.Tensor, keep: int, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``keep`` indices per row of ``score[B, N]``, ties to the lower index, returned ascending.

    Scored in fp32; invalid entries (``valid_mask`` False) are never chosen.
    """
    s = score.float()
    if valid_mask is not None:
        s = s.masked_fill(~valid_mask, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=-1).values
