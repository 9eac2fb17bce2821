"""FlowCut (NeurIPS'25, arXiv 2505.19536): information-flow pruning progressively *inside the vision encoder*,
implemented from SELECTORS.md §6.5.

At every ViT layer i before the one whose output feeds the projector, each patch gets
``f = (a/Σa + s/Σs) · ‖v̄‖₁`` (a: [CLS]→patch attention; s: softmax of the [CLS] value against every value;
v̄: the patch's value averaged over heads), accumulated as ``c ← 0.5·c + 0.5·f``. When the remaining number of
pruning layers ρ_i is even, the encoder drops ``round((N_i − T)/√ρ_i · (1 − (E/E_max)²))`` patches (E: entropy of
the renormalised [CLS] attention; the batch uses the largest amount), and at ρ_i = 0 it cuts to exactly T. [CLS]
stays in front; kept patches stay in ascending order. Later layers therefore run on fewer tokens, and exactly
``keep`` patches reach the projector. The encoder-side loop lives with the adapters (``adapters.base.
flowcut_in_tower``; InternVL drops whole 2×2 pixel-shuffle blocks); this file holds the arithmetic, so it is
testable alone.

LLM-stage variant (§6.5, FlowCut-Qwen / FlowCut-NeXT second stage): at ``llm:K`` the same score is computed from
the last prompt token's query and value in decoder layer K−1 (``softmax(q·Kᵀ/√d)``, ``softmax(v·Vᵀ/√d)``, ‖v̄‖₁)
and the top-``keep`` visual tokens survive with their own positions (preserve; 3-D M-RoPE columns on Qwen). Families
whose vision tower vtprune cannot prune inside (no [CLS]: Qwen2-VL; AnyRes packing: LLaVA-NeXT) get this variant
at its default layer 2 (after decoder layer 1, as in the reference) when ``prune(..., method="flowcut")`` names no
layer; the report's ``stage`` says ``llm:2``.

``select_tokens("flowcut", ...)`` runs one step of the score on given statistics (``flow_stats[B, 3, N]``), which is
what a single-layer FlowCut would keep; the real method needs the encoder (``vtprune.prune(model, method=
"flowcut", keep=...)``).

Option ``decay`` (the EMA weight of the accumulated score, ``c ← decay·c + (1 − decay)·f``): a number in [0, 1].
Non-finite statistics: a patch with a NaN or ±inf entry in any of its three statistics has no defined share of the
flow, so it is left out of the normalising sums and scores NaN, which ranks after every finite score (see
:func:`vtprune.selectors.base.topk_sorted`); the other patches score as if it were absent. Tokens whose
``valid_mask`` is False are never chosen. Features are not read.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, option_number, topk_sorted

NAME = "flowcut"


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming a bad ``decay`` and its valid range [0, 1]."""
    if "decay" in options:
        option_number(NAME, "decay", options["decay"], lo=0, hi=1)


def flow_score(stats: torch.Tensor) -> torch.Tensor:
    """stats [B, 3, N] (attention, semantic, value norm) over patches -> f [B, N] (fp32).

    A patch with a non-finite statistic is left out of the sums and scores NaN (one bad patch would otherwise turn
    every patch's normalised share into NaN).
    """
    st = stats.float()
    ok = torch.isfinite(st).all(1)  # [B, N]
    st = torch.where(ok[:, None], st, 0.0)
    a, s, n = st[:, 0], st[:, 1], st[:, 2]
    f = (a / a.sum(-1, keepdim=True).clamp(min=1e-12) + s / s.sum(-1, keepdim=True).clamp(min=1e-12)) * n
    return f.masked_fill(~ok, float("nan"))


def cut_amount(attention: torch.Tensor, target: int, rho: int) -> int:
    """Patches to drop after a layer with ``rho`` pruning layers left (even ρ only); attention [B, N] over patches."""
    n = attention.shape[-1]
    if rho <= 0:
        return max(0, n - target)
    a = attention.float()
    a = torch.where(torch.isfinite(a), a, 0.0)  # non-finite attention counts as none (as in flow_score)
    p = a / a.sum(-1, keepdim=True).clamp(min=1e-12)
    ent = -(p * p.clamp(min=1e-12).log()).sum(-1)
    e_max = math.log(n) if n > 1 else 1.0
    amount = (n - target) / math.sqrt(rho) * (1 - (ent / e_max) ** 2)
    # A NaN amount (negative attention) drops nothing early; the last step still cuts to exactly ``target``.
    amount = torch.nan_to_num(torch.round(amount), nan=0.0).clamp(min=0)
    return int(amount.max())  # one common amount keeps the batch rectangular


def flowcut_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
                   flow_stats: torch.Tensor | None = None, decay: float = 0.5, **signals: Any) -> torch.Tensor:
    """One-layer form: features [B, N, D], flow_stats [B, 3, N] -> LongTensor[B, keep], top-k of f, ascending.

    ``decay`` is checked but has no effect on a single layer (it weighs the score across encoder layers)."""
    check_inputs(NAME, features, keep, valid_mask)
    check_signal(NAME, "flow_stats", flow_stats, (features.shape[0], 3, features.shape[1]))
    check_options({"decay": decay})
    return topk_sorted(flow_score(detached(flow_stats)), keep, valid_mask).to(features.device)


SPEC = SelectorSpec(name=NAME, fn=flowcut_select, requires=("flow_stats",), stages=("vision", "llm"),
                    options={"decay": 0.5}, newlines="keep", default_layer=2, check_options=check_options,
                    description="FlowCut: progressive information-flow pruning inside the vision encoder")
