"""VFlowOpt-style pruning with recycling (ICCV'25, arXiv 2508.05211; implemented from SELECTORS.md §6.6 only — the
reference code is CC BY-NC and was not used).

Importance: the attention each token receives from the image's "global" tokens (those receiving more than ``t`` ×
the mean attention) in the ViT layer feeding the projector — computed by the adapter's probe (signal
``vflow_importance``). The most important tokens are kept; every other token is *recycled*: the dropped tokens are
grouped by a ``cells`` × ``cells`` spatial grid and each non-empty group becomes one token, the importance-weighted
mean of its members, placed at the slot (and position) of its most important member. So up to ``keep`` tokens
enter the language model: ``keep − cells²`` kept as they are plus one summary per non-empty group; the report
counts them. Not reproduced: the optional patch-entropy prior (α_v = 0 in every released configuration), the
offline Bayesian search and the later LLM stages.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from .base import SelectorSpec, check_inputs, check_signal, detached, option_number, rank_desc, topk_sorted

NAME = "vflowopt"


def _cells(grid: object, n: int, cells: int, device: torch.device) -> torch.Tensor:
    """Cell id [N] of every token: a cells × cells split of each (h, w) segment of ``grid`` (raster order)."""
    segs = grid if isinstance(grid, list) else [grid] if grid is not None else [(1, n)]
    ids, base = [], 0
    for h, w in segs:
        y = torch.arange(h, device=device)[:, None].expand(h, w) * cells // h
        x = torch.arange(w, device=device)[None, :].expand(h, w) * cells // w
        ids.append((y * cells + x).flatten() + base)
        base += cells * cells
    out = torch.cat(ids)
    if out.numel() != n:
        raise ValueError(f"vflowopt: grid {grid!r} covers {out.numel()} tokens, features have {n}")
    return out


def check_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming a bad ``cells`` and its valid range (an int ≥ 0)."""
    if "cells" in options:
        option_number(NAME, "cells", options["cells"], lo=0, integer=True)


def vflowopt_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
                    vflow_importance: torch.Tensor | None = None, grid: object = None, cells: int = 2,
                    **signals: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, N, D], vflow_importance [B, N] -> (indices LongTensor[B, keep] ascending then -1 padding,
    tokens FloatTensor[B, keep, D] to inject at those indices: kept tokens unchanged, recycled group summaries).

    ``cells``: each grid segment is split into up to ``cells`` × ``cells`` recycling groups (an int ≥ 0; fewer when
    the budget has no room for them, 0 = no recycling: plain top-``keep`` by importance).

    Non-finite input: a NaN or ±inf importance is "unknown": the token ranks after every finite one (never kept
    directly while a finite one is left, never a group's anchor while a member with finite importance exists) and
    weighs nothing in its group's summary. A token whose feature row is not finite weighs nothing in a summary either
    (so it does not turn its group's summary into NaN); a group whose members all weigh nothing averages its members
    with finite features uniformly (zeros if there are none). Indices are computed on detached inputs; the returned
    tokens are built from ``features`` itself, so they carry its autograd graph.
    """
    check_inputs(NAME, features, keep, valid_mask)
    check_signal(NAME, "vflow_importance", vflow_importance, tuple(features.shape[:2]))
    check_options({"cells": cells})
    if valid_mask is not None and not bool(valid_mask.all()):
        raise ValueError("vflowopt needs every token of the image's grid (valid_mask must be all True)")
    b, n, d = features.shape
    raw = detached(vflow_importance).float()
    known = torch.isfinite(raw)
    imp = torch.where(known, raw.clamp(min=0), 0.0)  # summary weights
    rank = imp.masked_fill(~known, float("nan"))  # NaN ranks last in topk_sorted / rank_desc
    feat_ok = torch.isfinite(detached(features)).all(-1)  # [B, N]
    n_seg = len(grid) if isinstance(grid, list) else 1
    # Largest cell count ≤ ``cells`` with n_seg·cells² < keep: leaves room for at least one directly kept token.
    # (Computed, not counted down, so a huge ``cells`` costs nothing.)
    cells = min(operator.index(cells), math.isqrt((keep - 1) // n_seg))
    if cells == 0 or keep == n:  # too small a budget to recycle anything: plain top-k by importance
        idx = topk_sorted(rank, keep)
        return idx, features.gather(1, idx[..., None].expand(-1, -1, d))
    cell = _cells(grid, n, cells, features.device)
    direct = keep - int(cell.max()) - 1  # room for one summary per possible group
    kept = topk_sorted(rank, direct)  # [B, direct]
    clean = torch.where(feat_ok[..., None], features, torch.zeros((), dtype=features.dtype, device=features.device))
    idx = torch.full((b, keep), -1, dtype=torch.long, device=features.device)
    out = torch.zeros(b, keep, d, dtype=features.dtype, device=features.device)
    for r in range(b):
        dropped = torch.ones(n, dtype=torch.bool, device=features.device)
        dropped[kept[r]] = False
        slots, toks = [kept[r]], [features[r, kept[r]]]
        for c in cell[dropped].unique():
            members = (dropped & (cell == c)).nonzero().flatten()
            anchor = members[rank_desc(rank[r, members])[0]]  # most important member, first on ties
            w = imp[r, members] * feat_ok[r, members]
            if float(w.sum()) > 0:
                w = w / w.sum()
            elif bool(feat_ok[r, members].all()):
                w = torch.full_like(w, 1.0 / w.numel())
            else:
                w = feat_ok[r, members].float() / feat_ok[r, members].sum().clamp(min=1)
            slots.append(anchor[None])
            toks.append((w[:, None] * clean[r, members].float()).sum(0, keepdim=True).to(features.dtype))
        s, t = torch.cat(slots), torch.cat(toks)
        order = s.argsort()
        idx[r, : s.numel()] = s[order]
        out[r, : s.numel()] = t[order]
    return idx, out


SPEC = SelectorSpec(merges=True, name=NAME, fn=vflowopt_select, requires=("vflow_importance",), optional=("grid",),
                    options={"cells": 2}, adaptive=True, newlines="keep", check_options=check_options,
                    description="VFlowOpt-style: importance from global-token attention + recycling of the rest")
