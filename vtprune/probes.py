"""Attention probes that keep the real attention on SDPA / flash.

A probe is a transformers ``AttentionInterface`` function registered as ``"vtprune_probe+<base>"``. It calls the
base implementation unchanged and, only for attention modules that are armed, also reduces the query/key tensors
the model already built to the signal a selector needs — e.g. the [CLS] row (O(H·L·d)) or the attention each token
receives (streamed over query blocks, O(H·L) memory) — instead of materialising every map with eager attention.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable
from typing import Any

import torch

PREFIX = "vtprune_probe+"

# module -> ((reducer, results), ...) armed in the running context only: a thread (or task) running the same model
# at the same time never fires another's probes. Copy-on-write, restored on exit (Captures nest, LIFO).
_ARMED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vtprune_armed", default=None)


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" is each model file's own function, not a registered one
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"vtprune probe: no attention function {base!r} for {type(module).__name__}")
    return fn


def _probs(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + mask) in fp32, as eager computes it. q [B,H,R,d], k [B,Hkv,L,d] -> [B,H,R,L]."""
    q, k = q.float(), k.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    w = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is not None:  # boolean masks mean "may attend"; float masks are additive, as the model uses them
        w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask.float()
    return torch.softmax(w, dim=-1)


def _segments(query: torch.Tensor, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
    """Independent sequences packed along L (flash varlen passes ``cu_seq_lens_q``); one segment otherwise."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return [(0, query.shape[2])]
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def cls_row(query, key, value, attention_mask, scaling, kwargs) -> torch.Tensor:
    """Head-mean attention of query 0 ([CLS]) over all keys: [B, L]."""
    mask = attention_mask[:, :, :1, : key.shape[-2]] if attention_mask is not None and attention_mask.dim() == 4 \
        else None
    return _probs(query[:, :, :1], key, scaling, mask)[:, :, 0].mean(1)


def cls_logits(query, key, value, attention_mask, scaling, kwargs) -> torch.Tensor:
    """Head-mean pre-softmax scaled logits of query 0 ([CLS]) over all keys: [B, L] (GlobalCom² uses logits)."""
    q, k = query[:, :, :1].float(), key.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (torch.matmul(q, k.transpose(-1, -2)) * scaling)[:, :, 0].mean(1)


def global_importance(query, key, value, attention_mask, scaling, kwargs, t: float = 30.0) -> torch.Tensor:
    """VFlowOpt's importance map: attention each token receives from the "global" tokens — those receiving more than
    ``t`` × the mean received attention — head mean; all queries when no token qualifies. [B, L] per segment."""
    out = torch.zeros(query.shape[0], query.shape[2], dtype=torch.float32, device=query.device)
    for s, e in _segments(query, kwargs):
        m = attention_mask[:, :, s:e, s:e] if attention_mask is not None and attention_mask.dim() == 4 else None
        a = _probs(query[:, :, s:e], key[:, :, s:e], scaling, m).mean(1)  # [B, L, L] head mean
        rho = a.mean(1)  # received attention per token
        g = rho > t * rho.mean(-1, keepdim=True)
        g = torch.where(g.any(-1, keepdim=True), g, torch.ones_like(g))  # empty global set: all queries
        out[:, s:e] = (a * g[:, :, None]).sum(1) / g.sum(-1, keepdim=True)
    return out


def received_attention(query, key, value, attention_mask, scaling, kwargs, block: int = 1024) -> torch.Tensor:
    """Head-mean attention each token receives, averaged over all queries of its own sequence: [B, L].

    Streams over query blocks so memory stays O(H·block·L); packed varlen segments are scored separately.
    """
    out = torch.zeros(query.shape[0], query.shape[2], dtype=torch.float32, device=query.device)
    for s, e in _segments(query, kwargs):
        k = key[:, :, s:e]
        acc = torch.zeros(query.shape[0], query.shape[1], e - s, dtype=torch.float32, device=query.device)
        for r in range(s, e, block):
            m = None
            if attention_mask is not None and attention_mask.dim() == 4:
                m = attention_mask[:, :, r:min(r + block, e), s:e]
            acc += _probs(query[:, :, r:min(r + block, e)], k, scaling, m).sum(2)
        out[:, s:e] = acc.mean(1) / (e - s)
    return out


def received_causal(query, key, value, attention_mask, scaling, kwargs, block: int = 512) -> torch.Tensor:
    """Attention each token receives in a language-model layer, head mean, averaged over every query row that
    attends to anything (VLA-Pruner's semantic criterion): [B, L]. The model's 4-D mask is used when it passes one;
    with none (SDPA's own causal path) the causal mask is applied here. Padding query rows, which attend to nothing,
    are left out of the mean. Streamed over query blocks: O(H·block·L) memory."""
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    total = torch.zeros(b, k_len, dtype=torch.float32, device=query.device)
    rows = torch.zeros(b, 1, dtype=torch.float32, device=query.device)
    for r in range(0, q_len, block):
        e = min(r + block, q_len)
        if attention_mask is not None and attention_mask.dim() == 4:
            m = attention_mask[:, :, r:e, :k_len]
        else:  # queries are the last q_len positions of the k_len keys
            qpos = torch.arange(r, e, device=query.device) + (k_len - q_len)
            m = (torch.arange(k_len, device=query.device)[None, :] <= qpos[:, None])[None, None]
        p = _probs(query[:, :, r:e], key, scaling, m).mean(1)  # [B, rows, L]
        ok = torch.isfinite(p).all(-1, keepdim=True)
        total += torch.where(ok, p, 0.0).sum(1)
        rows += ok.float().sum(1)
    return total / rows.clamp(min=1)


def _make_probe(base: str) -> Callable:
    def probe(module, query, key, value, attention_mask, *args, **kwargs):
        armed = _ARMED.get()
        entries = armed.get(module, ()) if armed else ()
        if entries:
            # scores are computed without autograd: selection is not differentiable, and a grad-enabled forward
            # (fine-tuning with pruning) must not keep the probe's intermediates alive
            scaling = kwargs.get("scaling", query.shape[-1] ** -0.5)
            with torch.no_grad():
                q, k, v = query.detach(), key.detach(), value.detach()
                for reducer, results, _ in entries:
                    results.append(reducer(q, k, v, attention_mask, scaling, kwargs))
            if any(stop for _, _, stop in entries):
                raise ProbeStop  # a scoring-only call: the signal is read, the attention itself is not needed
        return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)

    return probe


def probe_name(base: str) -> str:
    """Register (once) and return the probe implementation name wrapping ``base``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_probe(base))
    # the mask format follows the implementation name; without this an unknown name gets no padding mask at all
    masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    if name not in masks and base in masks:
        AttentionMaskInterface.register(name, masks[base])
    return name


class ProbeStop(Exception):
    """Raised by the probe of a ``Capture(..., stop=True)`` once its signal is read (caught by the caller)."""


class Capture:
    """Arm ``module`` for the calls inside the block: ``with Capture(attn, cls_row) as c: ...; c.results``.

    ``results`` holds one reduced tensor per call of the module's attention function (some towers call it once per
    image); it is empty if the probe never fired (the attention implementation was changed behind vtprune's back).
    ``stop=True``: the probe raises ``ProbeStop`` after reading, so a call made only to score (PyramidDrop's layer
    before it runs) skips the attention itself.
    """

    def __init__(self, module: torch.nn.Module, reducer: Callable, stop: bool = False):
        self.module, self.reducer, self.stop = module, reducer, stop
        self.results: list[torch.Tensor] = []

    def __enter__(self) -> Capture:
        armed = dict(_ARMED.get() or {})
        entry = (self.reducer, self.results, self.stop)
        armed[self.module] = (*armed.get(self.module, ()), entry)  # several signals may read one layer
        self._token = _ARMED.set(armed)
        return self

    def __exit__(self, *exc: object) -> None:
        _ARMED.reset(self._token)


def _last_real(attention_mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
    """[B] the last query row that is a real token: its own key is visible (padding rows see nothing, not even
    themselves). None when every row's last query is real (no 4-D mask, or left padding)."""
    if attention_mask is None or attention_mask.dim() != 4 or q_len != k_len:
        return None
    diag = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # [B, L]
    real = diag if diag.dtype == torch.bool else diag == 0  # additive float masks: 0 = may attend
    if bool(real[:, -1].all()):
        return None
    idx = torch.arange(q_len, device=real.device).expand_as(real)
    return idx.masked_fill(~real, -1).amax(-1).clamp(min=0)


def last_row(query, key, value, attention_mask, scaling, kwargs) -> torch.Tensor:
    """Head-mean attention of the last real query (the last prompt token, under left or right padding) over all
    keys: [B, L]."""
    last = _last_real(attention_mask, query.shape[2], key.shape[2])
    if last is None:
        mask = attention_mask[:, :, -1:, : key.shape[-2]] if attention_mask is not None and \
            attention_mask.dim() == 4 else None
        return _probs(query[:, :, -1:], key, scaling, mask)[:, :, 0].mean(1)
    rows = last[:, None, None, None]
    q = query.gather(2, rows.expand(-1, query.shape[1], 1, query.shape[-1]))
    mask = attention_mask.gather(2, rows.expand(-1, attention_mask.shape[1], 1, attention_mask.shape[-1]))
    return _probs(q, key, scaling, mask[..., : key.shape[-2]])[:, :, 0].mean(1)


def action_rows(query, key, value, attention_mask, scaling, kwargs) -> torch.Tensor:
    """Head-mean attention of the action queries over all keys, averaged over them: [B, L]. The queries are a
    policy's action-expert suffix (π0: the state token first, then the action chunk; the state token is left out)."""
    q = query[:, :, 1:] if query.shape[2] > 1 else query
    mask = None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[:, :, -q.shape[2]:, : key.shape[-2]]
    return _probs(q, key, scaling, mask).mean(dim=(1, 2))


def flow_stats(query, key, value, attention_mask, scaling, kwargs) -> torch.Tensor:
    """FlowCut's per-token statistics from one attention call: [B, 3, L] =
    ([CLS]→token attention, head mean; per-head softmax of v_CLS·v_j (unscaled), head mean; ‖mean_h v_j‖₁)."""
    a = _probs(query[:, :, :1], key, scaling, None)[:, :, 0].mean(1)
    v = value.float()
    if v.shape[1] != query.shape[1]:
        v = v.repeat_interleave(query.shape[1] // v.shape[1], dim=1)
    sem = torch.softmax(torch.matmul(v[:, :, :1], v.transpose(-1, -2))[:, :, 0], dim=-1).mean(1)
    norm = v.mean(1).abs().sum(-1)
    return torch.stack([a, sem, norm], 1)


def last_flow_logits(query, key, value, attention_mask, scaling, kwargs) -> torch.Tensor:
    """FlowCut's LLM-stage inputs from the last query (the last prompt token under left padding): [B, 2H + 1, L] =
    per-head scaled logits q_last·kᵀ (rows 0..H−1), per-head scaled v_last·vᵀ (rows H..2H−1) and ‖mean_h v_j‖₁ (the
    last row). The reference takes each softmax over the visual keys only, per head, before the head mean: that
    happens per image in ``flow_stats_over``, once the image's positions are known."""
    last = _last_real(attention_mask, query.shape[2], key.shape[2])  # the last real token (any padding side)
    if last is None:
        q, v_last = query[:, :, -1:].float(), value[:, :, -1:].float()
    else:
        rows = last[:, None, None, None]
        q = query.gather(2, rows.expand(-1, query.shape[1], 1, query.shape[-1])).float()
        v_last = value.gather(2, rows.expand(-1, value.shape[1], 1, value.shape[-1])).float()
    k, v = key.float(), value.float()
    h = q.shape[1]
    if k.shape[1] != h:  # grouped KV heads: every query head reads its group's keys and values
        rep = h // k.shape[1]
        k, v, v_last = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), v_last.repeat_interleave(
            rep, dim=1)
    rel = torch.matmul(q, k.transpose(-1, -2))[:, :, 0] * scaling
    sem = torch.matmul(v_last, v.transpose(-1, -2))[:, :, 0] * scaling
    return torch.cat([rel, sem, v.mean(1).abs().sum(-1)[:, None]], 1)


def flow_stats_over(logits: torch.Tensor) -> torch.Tensor:
    """``last_flow_logits`` restricted to one image's tokens ([..., 2H + 1, n]) -> FlowCut's ``flow_stats``
    [..., 3, n]: softmax over those n keys per head, then the head mean (relation, semantic), and the value norm."""
    h = (logits.shape[-2] - 1) // 2
    rel = torch.softmax(logits[..., :h, :], dim=-1).mean(-2)
    sem = torch.softmax(logits[..., h:2 * h, :], dim=-1).mean(-2)
    return torch.stack([rel, sem, logits[..., -1, :]], -2)
