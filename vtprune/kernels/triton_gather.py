"""Triton row-gather kernel behind :func:`vtprune.kernels.gather_tokens` and :func:`vtprune.kernels.compact_kv`.

Imported lazily by the dispatcher only (``import vtprune`` must not import triton). ``TRITON_INTERPRET`` is read by
``@triton.jit`` when this module is imported, so under the interpreter it has to be set before the first import;
:data:`INTERPRETED` records which mode the kernel was built in.

One kernel serves both callers. Everything is viewed as a 5-D source ``x[L, B, H, N, D]`` (any strides) gathered
along ``N`` with ``index[B, K]`` (shared by every layer ``L`` and head ``H``) into a contiguous ``out[L, B, H, K, D]``:

* ``gather_tokens``: ``L = H = 1``.
* ``compact_kv`` of one cache ``[B, H, S, Dh]``: ``L = 1``.
* ``compact_kv`` of a list of caches: the layer axis. Separate tensors are not one strided tensor, so the layer base
  is either a plain stride (when the caches happen to be equally spaced views of one allocation, which costs
  nothing to detect) or an int64 table of per-layer element offsets relative to the first cache. Offsets rather
  than raw pointers keep the pointer type (and the compiler's alignment facts) of the first cache; every cache has
  the same dtype and strides (checked by the caller), so one launch covers all layers. Stacking the inputs into one
  tensor would cost a full extra read+write of every cache, which is what this kernel exists to avoid.

Indices are not bounds-checked here (a check would need a host sync or a device assert on the hot path): callers
must pass values in ``[0, N)``; the torch reference raises on bad indices, and ``VTPRUNE_KERNEL_DEBUG=1`` makes the
dispatcher check before launching.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: True when ``@triton.jit`` produced an interpreter function (``TRITON_INTERPRET=1`` at import time): the kernel
#: then runs on CPU tensors, and only there is it meant to (it is orders of magnitude slower than torch).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# The kernel copies bits, so every dtype is moved as the unsigned-agnostic integer of the same width: that makes the
# copy bit-exact for every float (NaN payloads, -0.0, fp8, complex64) and bounds the number of compiled variants.
_INT_OF_SIZE: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Per-row chunk of the tile, in bytes: 1 KiB = 64 lanes x 16-byte vectors, i.e. two warps of full-width loads.
_ROW_CHUNK_BYTES = 1024
# Elements per program at most; 8192 x 2 bytes = 16 KiB of loads in flight per program for fp16/bf16.
_TILE_ELEMS = 8192
# Keep at least this many programs in flight on a GPU (H100 has 132 SMs; ~4 programs per SM hides latency) by
# shrinking BLOCK_K for small gathers. The interpreter runs programs one after another, so there it is not applied.
_MIN_PROGRAMS = 528
_MIN_BLOCK_K = 2


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernel can move elements of ``dtype`` (any dtype whose element size is 1, 2, 4 or 8 bytes)."""
    return _element_size(dtype) in _INT_OF_SIZE


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype != torch.bool else 1


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    idx_ptr,
    out_ptr,
    layer_off_ptr,
    B,
    H,
    K,
    D,
    stride_xl,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ib,
    stride_ik,
    num_kb,
    num_db,
    USE_OFFSET_TABLE: tl.constexpr,
    LAYER_ALIGN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # d-blocks vary fastest so that neighbouring programs read neighbouring bytes of the same source rows.
    pid = tl.program_id(0)
    db = pid % num_db
    rest = pid // num_db
    kb = rest % num_kb
    rest = rest // num_kb
    bh = rest % (B * H)
    layer = (rest // (B * H)).to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    # Masked tail rows read index 0 (always valid) and are never stored.
    rows = tl.load(idx_ptr + b * stride_ib + offs_k.to(tl.int64) * stride_ik, mask=mask_k, other=0).to(tl.int64)

    if USE_OFFSET_TABLE:
        layer_base = tl.multiple_of(tl.load(layer_off_ptr + layer), LAYER_ALIGN)
    else:
        layer_base = layer * stride_xl
    # All address arithmetic in int64: a [8, 32, 4096, 128] cache x 64 layers is past 2**31 elements.
    src_row = layer_base + b * stride_xb + h * stride_xh + rows * stride_xn
    out_row = ((layer * B + b) * H + h) * K + offs_k.to(tl.int64)

    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    src = x_ptr + src_row[:, None] + offs_d[None, :].to(tl.int64) * stride_xd
    dst = out_ptr + out_row[:, None] * D + offs_d[None, :]
    if EVEN_D:
        # Mask constant along D keeps the 16-byte vector loads/stores.
        mask = mask_k[:, None]
    else:
        mask = mask_k[:, None] & (offs_d[None, :] < D)
    vals = tl.load(src, mask=mask)
    tl.store(dst, vals, mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tile(K: int, D: int, elem: int, rows_total: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) for gathering ``rows_total`` row sets of ``K`` rows x ``D`` elements."""
    block_d = min(_next_pow2(D), max(1, _ROW_CHUNK_BYTES // elem))
    block_k = min(_next_pow2(K), max(1, _TILE_ELEMS // block_d))
    if not interpreted:
        num_db = triton.cdiv(D, block_d)
        while block_k > _MIN_BLOCK_K and rows_total * triton.cdiv(K, block_k) * num_db < _MIN_PROGRAMS:
            block_k //= 2
    tile_bytes = block_k * block_d * elem
    num_warps = 8 if tile_bytes >= 16384 else 4 if tile_bytes >= 2048 else 2
    return block_k, block_d, num_warps


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret ``t`` as the integer dtype of the same element size (a view: strides and storage are kept)."""
    target = _INT_OF_SIZE[_element_size(t.dtype)]
    if t.dtype == target:
        return t
    if t.dtype == torch.bool:
        return t.view(torch.uint8).view(torch.int8)
    return t.view(target)


def _launch(
    x0: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor,
    L: int,
    strides5: tuple[int, int, int, int, int],
    layer_offsets: torch.Tensor | None,
    layer_align: int,
) -> None:
    """Gather into ``out[L, B, H, K, D]`` (contiguous) from the 5-D view of ``x0`` described by ``strides5``."""
    _, B, H, K, D = out.shape
    if out.numel() == 0:
        return
    elem = x0.element_size()
    block_k, block_d, num_warps = _tile(K, D, elem, L * B * H, INTERPRETED)
    num_kb = triton.cdiv(K, block_k)
    num_db = triton.cdiv(D, block_d)
    grid = (L * B * H * num_kb * num_db,)
    use_table = layer_offsets is not None
    _gather_rows_kernel[grid](
        _as_int(x0),
        index,
        _as_int(out),
        layer_offsets if use_table else index,  # unused placeholder pointer when there is no table
        B,
        H,
        K,
        D,
        *strides5,
        index.stride(0),
        index.stride(1),
        num_kb,
        num_db,
        USE_OFFSET_TABLE=use_table,
        LAYER_ALIGN=layer_align,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        EVEN_D=D % block_d == 0,
        num_warps=num_warps,
        enable_fp_fusion=False,  # a pure copy has no FP math; also silences Triton 3.9's default-change warning
    )


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[B, N, D]`` (any strides), ``index[B, K]`` int32/int64 in ``[0, N)`` -> contiguous ``out[B, K, D]``.

    Inputs are assumed validated by the dispatcher (ranks, dtypes, devices, batch sizes).
    """
    B, _, D = x.shape
    K = index.shape[1]
    out = torch.empty((1, B, 1, K, D), dtype=x.dtype, device=x.device)
    _launch(x, index, out, 1, (0, x.stride(0), 0, x.stride(1), x.stride(2)), None, 1)
    return out.view(B, K, D)


def compact_kv_stacked(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``L`` caches ``[B, H, S, Dh]`` (same shape and dtype), ``index[B, K]`` -> contiguous ``out[L, B, H, K, Dh]``.

    ``out[l, b, h, k] = caches[l][b, h, index[b, k]]``. One launch when every cache has the same strides; otherwise
    one launch per cache (still correct, just not fused).
    """
    first = caches[0]
    B, H, _, Dh = first.shape
    L = len(caches)
    K = index.shape[1]
    out = torch.empty((L, B, H, K, Dh), dtype=first.dtype, device=first.device)
    if out.numel() == 0:
        return out
    elem = first.element_size()
    if any(c.stride() != first.stride() for c in caches):
        for layer, c in enumerate(caches):
            _launch(c, index, out[layer : layer + 1], 1, (0, *c.stride()), None, 1)
        return out

    ptrs = [c.data_ptr() for c in caches]
    diffs = [p - ptrs[0] for p in ptrs]
    step = diffs[1] if L > 1 else 0
    if all(d == i * step for i, d in enumerate(diffs)) and step % elem == 0:
        # Equally spaced views of one allocation (e.g. a pre-stacked cache): the layer axis is just a stride.
        _launch(first, index, out, L, (step // elem, *first.stride()), None, 1)
        return out

    offsets = [d // elem for d in diffs]  # data_ptr of same-dtype tensors is element-aligned
    # Tell the compiler how aligned the per-layer bases are (16 bytes enables vector loads), when they all are.
    vec = max(1, 16 // elem)
    layer_align = vec if all(o % vec == 0 for o in offsets) else 1
    table = torch.tensor(offsets, dtype=torch.int64)
    if first.is_cuda:
        # Pinned + non_blocking: the copy is stream-ordered before the kernel and does not block the host.
        table = table.pin_memory().to(first.device, non_blocking=True)
    _launch(first, index, out, L, (0, *first.stride()), table, layer_align)
    return out
