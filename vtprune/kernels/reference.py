"""Torch reference implementations of the kernels: the CPU path, the fallback, and what the Triton kernel is tested
against (``torch.equal``). Pure copies, so exact for every dtype. Out-of-range (or negative) indices raise: on CPU an
``IndexError``/``RuntimeError`` from torch, on CUDA a device-side assert.

Two formulations of the same copy, picked by device:

* CPU: ``index_select`` per batch row (and per layer), written straight into the output. On CPU ``torch.gather``
  with an expanded index is 10-30x slower than ``index_select``; a Python loop over ``B`` (and layers) is cheap there.
* CUDA: one ``torch.gather`` per tensor, so the launch count does not grow with ``B``.

Inputs are assumed validated by the dispatcher in :mod:`vtprune.kernels`.
"""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[B, N, D]``, ``index[B, K]`` (int32/int64) -> contiguous ``out[B, K, D]``.

    ``out[b, k] = x[b, index[b, k]]``.
    """
    if x.device.type == "cpu" or x.shape[0] == 1:
        return _gather_tokens_per_batch(x, index)
    return _gather_tokens_batched(x, index)


def compact_kv_stacked(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``L`` caches ``[B, H, S, Dh]`` (same shape/dtype), ``index[B, K]`` -> contiguous ``out[L, B, H, K, Dh]``.

    ``out[l, b, h, k] = caches[l][b, h, index[b, k]]``.
    """
    if caches[0].device.type == "cpu":
        return _compact_kv_per_batch(caches, index)
    return _compact_kv_batched(caches, index)


def _gather_tokens_per_batch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    B, _, D = x.shape
    out = torch.empty((B, index.shape[1], D), dtype=x.dtype, device=x.device)
    for b in range(B):
        # Per batch row, not one index_select over flattened [B*N, D] rows: an index >= N must raise, not silently
        # read the next batch row (and x may not be flattenable without a copy).
        torch.index_select(x[b], 0, index[b], out=out[b])
    return out


def _gather_tokens_batched(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    B, _, D = x.shape
    out = torch.empty((B, index.shape[1], D), dtype=x.dtype, device=x.device)
    torch.gather(x, 1, index.long().unsqueeze(-1).expand(B, -1, D), out=out)
    return out


def _compact_kv_per_batch(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    B, H, _, Dh = caches[0].shape
    out = torch.empty((len(caches), B, H, index.shape[1], Dh), dtype=caches[0].dtype, device=caches[0].device)
    for layer, cache in enumerate(caches):
        for b in range(B):
            torch.index_select(cache[b], 1, index[b], out=out[layer, b])
    return out


def _compact_kv_batched(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    B, H, _, Dh = caches[0].shape
    K = index.shape[1]
    out = torch.empty((len(caches), B, H, K, Dh), dtype=caches[0].dtype, device=caches[0].device)
    idx = index.long()[:, None, :, None].expand(B, H, K, Dh)
    for layer, cache in enumerate(caches):
        torch.gather(cache, 2, idx, out=out[layer])
    return out
