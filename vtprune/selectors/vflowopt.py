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

import torch

from .base import SelectorSpec, check_inputs, check_signal, topk_sorted


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


def vflowopt_select(features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None,
                    vflow_importance: torch.Tensor | None = None, grid: object = None, cells: int = 2,
                    **signals) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, N, D], vflow_importance [B, N] -> (indices LongTensor[B, keep] ascending then -1 padding,
    tokens FloatTensor[B, keep, D] to inject at those indices: kept tokens unchanged, recycled group summaries)."""
    check_inputs("vflowopt", features, keep, valid_mask)
    check_signal("vflowopt", "vflow_importance", vflow_importance, tuple(features.shape[:2]))
    if valid_mask is not None and not bool(valid_mask.all()):
        raise ValueError("vflowopt needs every token of the image's grid (valid_mask must be all True)")
    b, n, d = features.shape
    imp = vflow_importance.float().clamp(min=0)
    n_seg = len(grid) if isinstance(grid, list) else 1
    while cells > 0 and n_seg * cells * cells >= keep:  # leave room for at least one directly kept token
        cells -= 1
    if cells == 0 or keep == n:  # too small a budget to recycle anything: plain top-k by importance
        idx = topk_sorted(imp, keep)
        return idx, features.gather(1, idx[..., None].expand(-1, -1, d))
    cell = _cells(grid, n, cells, features.device)
    direct = keep - int(cell.max()) - 1  # room for one summary per possible group
    kept = topk_sorted(imp, direct)  # [B, direct]
    idx = torch.full((b, keep), -1, dtype=torch.long, device=features.device)
    out = torch.zeros(b, keep, d, dtype=features.dtype, device=features.device)
    for r in range(b):
        dropped = torch.ones(n, dtype=torch.bool, device=features.device)
        dropped[kept[r]] = False
        slots, toks = [kept[r]], [features[r, kept[r]]]
        for c in cell[dropped].unique():
            members = (dropped & (cell == c)).nonzero().flatten()
            w = imp[r, members]
            anchor = members[torch.argmax(w)]
            w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())
            slots.append(anchor[None])
            toks.append((w[:, None] * features[r, members].float()).sum(0, keepdim=True).to(features.dtype))
        s, t = torch.cat(slots), torch.cat(toks)
        order = s.argsort()
        idx[r, : s.numel()] = s[order]
        out[r, : s.numel()] = t[order]
    return idx, out


SPEC = SelectorSpec(name="vflowopt", fn=vflowopt_select, requires=("vflow_importance",), optional=("grid",),
                    options={"cells": 2}, adaptive=True, newlines="keep",
                    description="VFlowOpt-style: importance from global-token attention + recycling of the rest")
