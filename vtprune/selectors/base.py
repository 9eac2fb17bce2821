"""Selector contract shared by every method.

A selector is a pure function over tensors:

    fn(features: Tensor[B, N, D], keep: int, *, valid_mask: BoolTensor[B, N] | None, **signals)
        -> LongTensor[B, keep]   (ascending, unique, in range, exactly ``keep`` per row)

It knows nothing about model families. It declares the signals it ``requires`` so an adapter computes only
those, and the options a user may pass through ``vtprune.prune(..., **options)``.
"""

from __future__ import annotations

import math
import operator
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
    "layer_attention": "FloatTensor[B, N]: head-mean attention of the last prompt token over the visual tokens, "
                       "computed with the stage layer's own input norm, q/k projections and RoPE (PyramidDrop)",
    "subimage_rank": "LongTensor[B, N]: rank (0 = highest, ties to the lower patch index) of the token's "
                     "cls_attention among all patches of its sub-image before unpadding removed any",
    "crop_grid": "LongTensor[B, N, 2]: the image's crop grid (rows, cols) on every token, (0, 0) without crops; "
                 "crop id = 1 + r·cols + c",
    "prefill_attention": "FloatTensor[B, N]: attention each visual token receives at LLM layer K-1: column mean over "
                         "all prompt query rows, head mean (VLA-Pruner's semantic criterion)",
    "action_attention": "FloatTensor[B, N]: temporal estimate, from earlier control steps, of the attention the "
                        "action-decode tokens pay to each visual token, unit sum per row (VLA-Pruner)",
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
    #: returns (indices, tokens): some kept slots receive merged tokens instead of their own features (vflowopt)
    merges: bool = False
    #: what an llm:K stage passes as ``features``: "hidden" (the hidden states entering layer K) or "embeddings"
    #: (the layer-0 input embeddings of the same tokens; VLA-Pruner's diversity filter)
    features: str = "hidden"
    #: ``check_options(options)`` raises ValueError naming a bad option value and its valid range; called by
    #: ``prune()`` with the options the user gave, so a bad value fails before the model is touched
    check_options: Callable[[dict[str, Any]], None] | None = None


def option_number(method: str, name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise ValueError unless ``value`` is a real number (an int if ``integer``) inside the given range.

    The message names the method, the option, the bad value and the valid range, e.g.
    ``atp: option mass must be a number in (0, 1], got -1``. ``integer`` accepts int-like values (numpy ints,
    0-d integer tensors: ``operator.index``) but never bools or floats; a non-integer number must be finite.
    """
    kind = "an int" if integer else "a number"
    rng = ""
    if lo is not None or hi is not None:
        rng = (f" in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
               f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
    v: Any = None
    if not isinstance(value, bool):
        if integer:
            try:
                v = operator.index(value)
            except TypeError:
                v = None
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            v = value
    ok = v is not None
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise ValueError(f"{method}: option {name} must be {kind}{rng}, got {value!r}")


def option_choice(method: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (the message lists them)."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{method}: option {name} must be one of {', '.join(repr(c) for c in choices)}, "
                         f"got {value!r}")


def option_schedule(method: str, name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is ``None`` (the method's default schedule) or a usable explicit schedule.

    Explicit: a non-empty list (or tuple) of ``(layer, ratio)`` pairs (2-item lists too, as JSON gives them):
    ``layer`` an int ≥ 1 (the decoder layer from which only the kept tokens are seen; the upper bound, the model's
    depth, is checked when ``prune()`` knows the model), ``ratio`` a number in (0, 1] of the image's tokens;
    layers strictly increasing (stages run in layer order) and ratios non-increasing (a later stage only sees the
    tokens an earlier one kept, so a larger ratio there could never be met).
    """
    if value is None:
        return
    what = (f"{method}: option {name} must be a non-empty list of (layer: int >= 1, keep ratio in (0, 1]) pairs "
            f"with strictly increasing layers and non-increasing ratios, got {value!r}")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(what)
    prev: tuple[int, float] | None = None
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{what}: item {i} {pair!r} is not a (layer, ratio) pair")
        layer, ratio = pair
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"{what}: item {i} has layer {layer!r}, not an int >= 1")
        if (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(float(ratio))
                or not 0.0 < float(ratio) <= 1.0):
            raise ValueError(f"{what}: item {i} has ratio {ratio!r}, not a number in (0, 1]")
        if prev is not None and layer <= prev[0]:
            raise ValueError(f"{what}: layer {layer} does not come after layer {prev[0]}")
        if prev is not None and float(ratio) > prev[1]:
            raise ValueError(f"{what}: ratio {ratio!r} at layer {layer} exceeds {prev[1]!r} at layer {prev[0]}")
        prev = (layer, float(ratio))


def detached(value: Any) -> Any:
    """``value.detach()`` for a tensor, ``value`` otherwise.

    Selection is not differentiable, and some selectors write into buffers in place (``out=``), which autograd
    refuses; so every selector scores on detached inputs, whether or not its caller disabled grad.
    """
    return value.detach() if isinstance(value, torch.Tensor) else value


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


def rank_desc(score: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``LongTensor[..., N]`` ordering the last dim of ``score[..., N]`` best first, in fp32.

    Order: by value descending (``+inf`` first, ``-inf`` after every finite value), then ``NaN`` entries, then
    the entries whose ``valid_mask`` is False; ties (and NaNs among themselves) go to the lower index. A NaN is
    "no score", so it never outranks a number; ``torch.sort`` alone would put it first.
    """
    s = score.float()
    nan = torch.isnan(s)
    order = torch.sort(s.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    tier = nan.to(torch.uint8)
    if valid_mask is not None:
        tier = tier.masked_fill(~valid_mask.to(s.device), 2)
    # A stable sort by tier keeps the value order inside each tier: a two-key sort in two passes.
    return order.gather(-1, torch.sort(tier.gather(-1, order), dim=-1, stable=True).indices)


def topk_sorted(score: torch.Tensor, keep: int, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``keep`` indices per row of ``score[B, N]``, ties to the lower index, returned ascending ``[B, keep]``.

    Scored in fp32 in the order of :func:`rank_desc`: ``+inf`` ranks first, ``-inf`` after every finite score,
    ``NaN`` after that, and invalid entries (``valid_mask`` False) are never chosen (callers guarantee
    ``keep`` ≤ the valid count, see :func:`check_inputs`).
    """
    return rank_desc(score, valid_mask)[:, :keep].sort(dim=-1).values
