"""VLA-Pruner (arXiv 2511.16449): temporal-aware dual-level visual-token pruning for vision-language-action policies,
implemented from SELECTORS.md §6.8 (reference ``MINT-SJTU/VLA-Pruner@fa5bfed``, MIT; no reference code is copied).

At every control step, inside the language model at ``llm:K`` (default K = 3), the image keeps ``keep`` tokens:

1. ``C_vl``  = top-``keep`` by ``prefill_attention`` (semantic criterion ``S_vl``: the attention each visual token
   receives at decoder layer K−1, column mean over all prompt query rows, head mean);
2. ``C_act`` = top-``keep`` by ``action_attention`` (the action criterion: a temporal estimate, from earlier control
   steps, of the attention the action-decode tokens pay to each visual token; see :func:`temporal_estimate`);
3. ``U = C_vl ∪ C_act``; if ``|U| > keep``, DivPrune's greedy max-min cosine diversity restricted to ``U`` (the most
   isolated token of ``U`` first, then farthest-first, ties to the lower index; fp32) on ``features`` — the visual
   tokens' layer-0 input embeddings (projector outputs), not the layer-K hidden states — cuts it to ``keep``;
   otherwise ``U`` is kept (``|U| = keep`` exactly when both criteria agree).

Batched without a loop over rows: the union is a ``[B, N]`` mask and the greedy of
:func:`vtprune.selectors.divprune.divprune_order` runs with ``valid_mask = U`` (only members of ``U`` are candidates
and nearest neighbours), so rows with unions of different sizes share one call; a row whose ``|U| = keep`` simply
picks all of ``U``.

Non-finite scores rank as :func:`vtprune.selectors.base.topk_sorted` ranks them (``+inf`` first, ``-inf`` after every
finite score, ``NaN`` after that), so a NaN-scored token enters a criterion only when too few tokens have a number.
A token whose feature row is non-finite is picked from ``U`` only after every finite member (DivPrune's rule). Tokens
whose ``valid_mask`` is False are in neither criterion and never chosen.

The episode-level part of the method (warm-up while fewer than ``window`` action-attention vectors are recorded,
recording the action→vision attention at ``record_layer``, resetting the history per episode) belongs to the
integrator; its options are declared here so that ``prune()`` validates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, option_choice, option_number, topk_sorted
from .divprune import divprune_order

NAME = "vla_pruner"
WEIGHTINGS = ("paper", "code")
OPTION_DEFAULTS: dict[str, Any] = {"window": 3, "gamma": 0.8, "weighting": "paper", "record_layer": None}


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad option value and its valid range.

    ``window``: int ≥ 1 (action-attention vectors in the temporal estimate; also the warm-up length);
    ``gamma``: number in (0, 1] (decay of the temporal weights); ``weighting``: ``"paper"`` or ``"code"``;
    ``record_layer``: ``None`` (the integrator's default, about half the depth) or an int ≥ 0 (decoder layer whose
    action→vision attention is recorded; the upper bound, the model's depth, is known only to the integrator).
    """
    if "window" in options:
        option_number(NAME, "window", options["window"], lo=1, integer=True)
    if "gamma" in options:
        option_number(NAME, "gamma", options["gamma"], lo=0, hi=1, lo_open=True)
    if "weighting" in options:
        option_choice(NAME, "weighting", options["weighting"], WEIGHTINGS)
    if "record_layer" in options and options["record_layer"] is not None:
        option_number(NAME, "record_layer", options["record_layer"], lo=0, integer=True)


def temporal_estimate(history: Sequence[torch.Tensor], gamma: float, weighting: str = "paper", *,
                      window: int | None = None) -> torch.Tensor:
    """Temporal estimate of the action→vision attention from recorded vectors.

    Args:
        history: ``[Tensor[B, N], ...]`` recorded action-attention vectors, oldest first: a non-empty list, tuple
            or deque of equal shapes.
        gamma: decay in (0, 1].
        weighting: ``"paper"``: the vector ``i`` steps back (``i = 1`` the most recent) weighs ``gamma**i``, so the
            most recent weighs most (paper, §6.8 step 2). ``"code"``: the reference code's reversed order, the most
            recent weighs ``gamma**(w-1)`` and the oldest ``gamma**0`` (``modeling_prismatic.py::predict_action``).
        window: use only the last ``window`` vectors (``None``: all of ``history``); ``w`` below is their count.

    Returns:
        fp32 ``Tensor[B, N]`` on the most recent vector's device: ``Σ_i weight_i · history_i``, divided by its row
        sum, so every row sums to 1 over its finite entries (a positive combination: the normalisation of the
        weights themselves cancels). A slot whose weighted sum is not finite (a NaN or ±inf recorded in it) is
        ``NaN`` — "no estimate", which ranks last — and the other slots are normalised without it. A row whose
        finite entries sum to ≤ 0 (nothing recorded yet attended anywhere) is uniform over its finite slots.
    """
    if isinstance(history, torch.Tensor) or not isinstance(history, Sequence) or len(history) == 0:
        raise ValueError(f"{NAME}: history must be a non-empty list of Tensor[B, N], oldest first, got "
                         f"{type(history).__name__}")
    history = list(history)  # a deque (the natural history buffer) cannot be sliced
    option_number(NAME, "gamma", gamma, lo=0, hi=1, lo_open=True)
    option_choice(NAME, "weighting", weighting, WEIGHTINGS)
    if window is not None:
        option_number(NAME, "window", window, lo=1, integer=True)
        history = history[-int(window):]
    shape = tuple(history[-1].shape)
    if len(shape) != 2 or any(not isinstance(h, torch.Tensor) or tuple(h.shape) != shape for h in history):
        raise ValueError(f"{NAME}: history vectors must all be tensors of one shape [B, N], got "
                         f"{[tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__ for h in history]}")
    w = len(history)
    g = float(gamma)
    # Weights up to a common factor, the largest one 1 (the normalisation below cancels the factor): exponents from
    # 0 instead of 1 keep the largest weight representable however small gamma is. Position j = 0 is the oldest.
    if weighting == "paper":
        weights = [g ** (w - 1 - j) for j in range(w)]  # ∝ gamma**i, i = w - j steps back
    else:
        weights = [g**j for j in range(w)]  # the reference's reversed order
    dev = history[-1].device
    acc = torch.zeros(shape, dtype=torch.float32, device=dev)
    for wt, h in zip(weights, history):
        if wt != 0.0:  # an underflowed weight contributes nothing, not 0 * NaN
            acc.add_(detached(h).to(device=dev, dtype=torch.float32), alpha=wt)
    finite = torch.isfinite(acc)
    acc = torch.where(finite, acc, float("nan"))
    total = torch.where(finite, acc, 0.0).sum(-1, keepdim=True)
    uniform = finite.float() / finite.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, acc / total.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.where(finite, uniform, float("nan")))


def criteria(prefill_attention: torch.Tensor, action_attention: torch.Tensor, keep: int,
             valid_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Membership masks ``(in C_vl, in C_act)``, each ``BoolTensor[B, N]``, of the two top-``keep`` criteria.

    Both signals are ``[B, N]`` scores, ranked in fp32 by :func:`topk_sorted` (ties to the lower index, non-finite
    rules there); ``valid_mask`` False tokens are in neither. Masks are on ``prefill_attention``'s device.
    """
    dev = prefill_attention.device
    vm = None if valid_mask is None else valid_mask.to(dev)
    b, n = prefill_attention.shape
    out = []
    for score in (prefill_attention, action_attention):
        idx = topk_sorted(detached(score).to(dev), keep, vm)
        out.append(torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, idx, True))
    return out[0], out[1]


def criterion_counts(kept: torch.Tensor, prefill_attention: torch.Tensor, action_attention: torch.Tensor, keep: int,
                     *, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """How many kept tokens came from which criterion, for the per-step report.

    Args:
        kept: ``LongTensor[B, k]`` kept indices (entries < 0 are padding and not counted).
        prefill_attention, action_attention: ``[B, N]`` the signals the selection used.
        keep: the budget the criteria were cut to (``C_vl``, ``C_act`` are top-``keep``).
        valid_mask: the ``valid_mask`` the selection used, if any.

    Returns:
        ``LongTensor[B, 3]``: kept tokens in ``C_vl`` only, in ``C_act`` only, in both. For the output of
        :func:`vla_pruner_select` the three add up to ``keep``.
    """
    in_vl, in_act = criteria(prefill_attention, action_attention, keep, valid_mask)
    kept = kept.to(in_vl.device)
    real = kept >= 0
    at = kept.clamp_min(0)
    vl = in_vl.gather(1, at) & real
    act = in_act.gather(1, at) & real
    return torch.stack([(vl & ~act).sum(1), (act & ~vl).sum(1), (vl & act).sum(1)], dim=1)


def vla_pruner_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
                      prefill_attention: torch.Tensor | None = None, action_attention: torch.Tensor | None = None,
                      **signals: Any) -> torch.Tensor:
    """features [B, N, D], prefill_attention [B, N], action_attention [B, N] -> LongTensor[B, keep], ascending.

    Args:
        features: ``[B, N, D]`` the visual tokens' layer-0 input embeddings (projector outputs); read only by the
            diversity filter.
        keep: tokens per row, ``1 <= keep <= N`` (and ≤ the valid count per row).
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never chosen.
        prefill_attention: ``[B, N]`` semantic criterion ``S_vl``.
        action_attention: ``[B, N]`` temporal estimate of action→vision attention (:func:`temporal_estimate`).
        **signals: other adapter signals, ignored; the method's options (``window``, ``gamma``, ``weighting``,
            ``record_layer``), if passed, are checked as ``prune()`` checks them and otherwise unused here.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``: unique, ascending, ⊆ ``C_vl ∪ C_act``.
    """
    check_inputs(NAME, features, keep, valid_mask)
    shape = tuple(features.shape[:2])
    check_signal(NAME, "prefill_attention", prefill_attention, shape)
    check_signal(NAME, "action_attention", action_attention, shape)
    check_options({k: v for k, v in signals.items() if k in OPTION_DEFAULTS})
    b, n, _ = features.shape
    dev = features.device
    if keep == n:
        return torch.arange(n, device=dev).expand(b, n).clone()
    in_vl, in_act = criteria(prefill_attention.to(dev), action_attention.to(dev), keep, valid_mask)
    union = in_vl | in_act  # [B, N], at least keep per row (C_vl alone has keep)
    # One host read: when every row's criteria agree there is nothing to filter, and the O(N^2 D) distance
    # matrix of the diversity step is skipped (topk of a 0/1 mask = the True positions, ascending).
    if bool((union.sum(1) == keep).all()):
        return topk_sorted(union.float(), keep)
    # Greedy max-min with only U valid: candidates and nearest neighbours are U's members, so the first pick is
    # the most isolated token *of U*, exactly as if the filter ran on the gathered subset (rows of any |U| ≥ keep).
    order, _ = divprune_order(features, keep, valid_mask=union)
    return order.sort(dim=-1).values


SPEC = SelectorSpec(
    name=NAME,
    fn=vla_pruner_select,
    requires=("prefill_attention", "action_attention"),
    stages=("llm",),
    text_guided=True,
    default_layer=3,
    features="embeddings",  # the diversity filter works on the layer-0 input embeddings (§6.8 invariant 7)
    options=dict(OPTION_DEFAULTS),
    check_options=check_options,
    description="VLA-Pruner (arXiv 2511.16449): union of the top-keep tokens by prefill attention at layer K-1 and "
                "by a temporal (decayed) estimate of action->vision attention from earlier control steps, cut to "
                "keep by DivPrune's max-min cosine diversity on the layer-0 embeddings; for VLA policies.",
)
