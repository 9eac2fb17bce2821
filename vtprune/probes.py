"""Attention-row probes that keep the real attention on SDPA / flash.

A probe is a transformers ``AttentionInterface`` function registered as ``"vtprune_probe+<base>"``. It calls the
base implementation unchanged and, only for attention modules that are armed, also computes the few attention
probability rows a selector needs (e.g. the [CLS] row) from the query/key tensors the model already built —
O(H·R·L·d) instead of materialising every attention map with eager.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch

PREFIX = "vtprune_probe+"

# module -> query rows to capture; results land in _RESULTS[module] as FloatTensor[B, H, R, L]
_ARMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RESULTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" is each model file's own function, not a registered one
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"vtprune probe: no attention function {base!r} for {type(module).__name__}")
    return fn


def attention_rows(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor | slice, scaling: float,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities of selected query rows, in fp32, exactly as eager computes them.

    query [B, H, Lq, d], key [B, Hkv, Lk, d] (grouped-query heads are repeated) -> [B, H, R, Lk].
    """
    q = query[:, :, rows].float()
    k = key.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    w = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if attention_mask is not None and attention_mask.dim() == 4:
        w = w + attention_mask[:, :, rows, : k.shape[-2]].float()
    return torch.softmax(w, dim=-1)


def _make_probe(base: str) -> Callable:
    def probe(module, query, key, value, attention_mask, *args, **kwargs):
        rows = _ARMED.get(module)
        if rows is not None:
            _RESULTS[module] = attention_rows(query, key, rows, kwargs.get("scaling", query.shape[-1] ** -0.5),
                                              attention_mask)
        return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)

    return probe


def probe_name(base: str) -> str:
    """Register (once) and return the probe implementation name wrapping ``base``."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_probe(base))
    return name


class Capture:
    """Arm ``module`` for one forward: ``with Capture(attn, rows=slice(0, 1)) as c: ...; c.result``."""

    def __init__(self, module: torch.nn.Module, rows: torch.Tensor | slice):
        self.module, self.rows = module, rows
        self.result: torch.Tensor | None = None

    def __enter__(self) -> Capture:
        _RESULTS.pop(self.module, None)
        _ARMED[self.module] = self.rows
        return self

    def __exit__(self, *exc: object) -> None:
        _ARMED.pop(self.module, None)
        self.result = _RESULTS.pop(self.module, None)
