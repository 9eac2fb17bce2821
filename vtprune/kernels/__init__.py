"""Token gather and KV-cache compaction: a Triton kernel on CUDA, the torch reference everywhere else.

Public API:

* :func:`gather_tokens` ``(x[B, N, D], index[B, K]) -> [B, K, D]``
* :func:`compact_kv` ``(cache[B, H, S, Dh] | list of them, index[B, K]) -> same structure with S -> K``
* :func:`kernel_backend` ``() -> "triton" | "torch"``

Backend choice, made at every call from ``VTPRUNE_KERNEL_BACKEND`` (read at call time, so tests and users can switch
without re-importing):

* ``auto`` (default): the Triton kernel for CUDA tensors when triton is importable, the torch reference otherwise
  (CPU, other devices, dtypes the kernel does not move, or a kernel built under ``TRITON_INTERPRET=1``, which would
  be far slower than torch on a GPU).
* ``triton``: always the Triton kernel. CUDA tensors, or CPU tensors when the Triton interpreter is active
  (``TRITON_INTERPRET=1`` set before ``vtprune.kernels.triton_gather`` is first imported). Anything else raises a
  ``RuntimeError`` saying why; an explicit request is never silently downgraded.
* ``torch``: always the reference (:mod:`vtprune.kernels.reference`).

Indices must lie in ``[0, N)``. The torch reference raises on bad indices. The Triton kernel does not check them
(that would need a host sync or a device assert on the hot path) and reads out of bounds if given bad ones; set
``VTPRUNE_KERNEL_DEBUG=1`` to have the dispatcher check them (with a host sync) before launching.

``import vtprune.kernels`` does not import triton: the kernel module is imported on the first call that needs it.
Both functions are registered as ``torch.library`` custom ops (``vtprune::gather_tokens``,
``vtprune::compact_kv_stacked``) with fake implementations and autograd, so ``torch.compile(fullgraph=True)`` traces
through them without graph breaks and gradients flow to ``x``/the caches whichever backend runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from types import ModuleType
from typing import Any, TypeVar

import torch

from . import reference

__all__ = ["compact_kv", "gather_tokens", "kernel_backend"]

BACKEND_ENV = "VTPRUNE_KERNEL_BACKEND"
DEBUG_ENV = "VTPRUNE_KERNEL_DEBUG"
BACKEND_CHOICES = ("auto", "triton", "torch")

_TRITON_MODULE = "vtprune.kernels.triton_gather"
_TRUTHY = ("1", "true", "yes", "on")
_INDEX_DTYPES = (torch.int32, torch.int64)
# The kernel moves elements as same-width integers; wider elements (complex128) go to the reference under auto.
_KERNEL_ELEMENT_SIZES = (1, 2, 4, 8)

CacheT = TypeVar("CacheT", torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...])


# --------------------------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------------------------


def _requested_backend() -> str:
    raw = os.environ.get(BACKEND_ENV, "auto")
    value = raw.strip().lower() or "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(
            f"{BACKEND_ENV}={raw!r} is not a valid kernel backend; valid choices: {', '.join(BACKEND_CHOICES)}"
        )
    return value


@functools.cache
def _triton_installed() -> bool:
    # find_spec, not import: deciding must not import triton (``import vtprune`` stays triton-free).
    return importlib.util.find_spec("triton") is not None


def _interpreter_active() -> bool:
    """Whether the Triton kernel runs (or, once imported, will run) under the interpreter."""
    module = sys.modules.get(_TRITON_MODULE)
    if module is not None:
        # Decided when the kernel was decorated; changing TRITON_INTERPRET afterwards has no effect.
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def check_triton_usable(device: torch.device, *, interpret: bool | None = None) -> None:
    """Raise ``RuntimeError`` if the Triton kernel cannot run on tensors on ``device``.

    ``interpret`` overrides the detection of the Triton interpreter (``None``: detect).
    """
    requested = f"{BACKEND_ENV}={os.environ.get(BACKEND_ENV, 'triton')!r} requests the Triton kernel"
    if not _triton_installed():
        raise RuntimeError(
            f"{requested}, but triton is not installed. Install triton (CUDA builds of torch ship it), "
            f"or set {BACKEND_ENV}=auto (or torch) to use the torch reference."
        )
    interpreted = _interpreter_active() if interpret is None else interpret
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreted:
            return
        module = sys.modules.get(_TRITON_MODULE)
        why = (
            f"{_TRITON_MODULE} was already imported without the interpreter, so the kernel is compiled for a GPU"
            if module is not None and not module.INTERPRETED
            else "the interpreter is not active (TRITON_INTERPRET=1 is not set)"
        )
        raise RuntimeError(
            f"{requested} for CPU tensors, but Triton runs on CPU only under its interpreter and {why}. "
            f"Move the tensors to a CUDA device, set TRITON_INTERPRET=1 before {_TRITON_MODULE} is first imported "
            f"(testing only: it is slow), or set {BACKEND_ENV}=auto (or torch) to use the torch reference."
        )
    raise RuntimeError(
        f"{requested} for tensors on {device.type!r}, but vtprune's Triton kernel supports only CUDA devices "
        f"(and CPU under TRITON_INTERPRET=1). Set {BACKEND_ENV}=auto (or torch) to use the torch reference."
    )


_warned_import_failure = False


def _load_triton_module(strict: bool) -> ModuleType | None:
    """Import the kernel module; on failure raise (``strict``) or warn once and return None (auto falls back)."""
    global _warned_import_failure
    try:
        import vtprune.kernels.triton_gather as module
    except Exception as exc:  # a broken triton install can fail with more than ImportError
        if strict:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton requests the Triton kernel, but importing {_TRITON_MODULE} failed: {exc!r}. "
                f"Fix the triton install or set {BACKEND_ENV}=auto (or torch)."
            ) from exc
        if not _warned_import_failure:
            warnings.warn(f"vtprune: Triton kernel unavailable ({exc!r}); using the torch reference", stacklevel=3)
            _warned_import_failure = True
        return None
    return module


def _choose(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The Triton kernel module to use for tensors of ``dtype`` on ``device``, or None for the torch reference."""
    requested = _requested_backend()
    if requested == "torch":
        return None
    supported = _element_size(dtype) in _KERNEL_ELEMENT_SIZES
    if requested == "triton":
        check_triton_usable(device)
        if not supported:
            raise TypeError(
                f"{BACKEND_ENV}=triton requests the Triton kernel, which moves elements of 1, 2, 4 or 8 bytes; "
                f"{dtype} is not supported. Set {BACKEND_ENV}=auto (or torch) to use the torch reference."
            )
        return _load_triton_module(strict=True)
    if device.type != "cuda" or not supported or not _triton_installed() or _interpreter_active():
        return None
    return _load_triton_module(strict=False)


def kernel_backend() -> str:
    """``"triton"`` or ``"torch"``: what :func:`gather_tokens` would use for a CUDA fp16 tensor right now.

    Does not import triton. Raises like the kernels do for an invalid or unmeetable ``VTPRUNE_KERNEL_BACKEND``.
    """
    requested = _requested_backend()
    device = torch.device("cuda")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        check_triton_usable(device)
        return "triton"
    return "triton" if _triton_installed() and not _interpreter_active() else "torch"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _debug_check_index(index: torch.Tensor, n: int, what: str) -> None:
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in _TRUTHY or index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())  # host sync: debug only
    if lo < 0 or hi >= n:
        raise IndexError(f"{what}: index values must be in [0, {n}), got min {lo} and max {hi}")


# --------------------------------------------------------------------------------------------------------------------
# Input validation (shape/dtype/device only, so it also runs on fake tensors under torch.compile)
# --------------------------------------------------------------------------------------------------------------------


def _check_index(index: object, batch: int, device: torch.device, what: str) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{what}: index must be a torch.Tensor, got {type(index).__name__}")
    if index.dim() != 2:
        raise ValueError(f"{what}: index must be 2-D [B, K], got shape {tuple(index.shape)}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{what}: index must be int32 or int64, got {index.dtype}")
    if index.shape[0] != batch:
        raise ValueError(f"{what}: batch mismatch, index has B={index.shape[0]} but the data has B={batch}")
    if index.device != device:
        raise ValueError(f"{what}: index is on {index.device} but the data is on {device}; put them on one device")


def _check_gather_inputs(x: object, index: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gather_tokens: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"gather_tokens: x must be 3-D [B, N, D], got shape {tuple(x.shape)}")
    _check_index(index, x.shape[0], x.device, "gather_tokens")
    if x.shape[1] == 0 and index.shape[1] > 0:
        raise IndexError("gather_tokens: x has no tokens (N=0) but index asks for some")


def _check_kv_inputs(caches: list[torch.Tensor], index: object) -> None:
    first = caches[0]
    for i, cache in enumerate(caches):
        if not isinstance(cache, torch.Tensor):
            raise TypeError(f"compact_kv: cache {i} must be a torch.Tensor, got {type(cache).__name__}")
        if cache.dim() != 4:
            raise ValueError(f"compact_kv: cache {i} must be 4-D [B, H, S, Dh], got shape {tuple(cache.shape)}")
        if cache.shape != first.shape or cache.dtype != first.dtype or cache.device != first.device:
            raise ValueError(
                f"compact_kv: all caches must share shape, dtype and device; cache 0 is {tuple(first.shape)} "
                f"{first.dtype} on {first.device}, cache {i} is {tuple(cache.shape)} {cache.dtype} on {cache.device}"
                " (call compact_kv per group of equal caches)"
            )
    _check_index(index, first.shape[0], first.device, "compact_kv")
    if first.shape[2] == 0 and index.shape[1] > 0:
        raise IndexError("compact_kv: caches have no positions (S=0) but index asks for some")


# --------------------------------------------------------------------------------------------------------------------
# Implementations behind the custom ops
# --------------------------------------------------------------------------------------------------------------------


def _gather_tokens_impl(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_gather_inputs(x, index)
    kernel = _choose(x.device, x.dtype)
    if kernel is None:
        return reference.gather_tokens(x, index)
    _debug_check_index(index, x.shape[1], "gather_tokens")
    return kernel.gather_tokens(x, index)


def _compact_kv_impl(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    _check_kv_inputs(caches, index)
    kernel = _choose(caches[0].device, caches[0].dtype)
    if kernel is None:
        return reference.compact_kv_stacked(caches, index)
    _debug_check_index(index, caches[0].shape[2], "compact_kv")
    return kernel.compact_kv_stacked(caches, index)


@torch.library.custom_op("vtprune::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _gather_tokens_impl(x, index)


@_gather_tokens_op.register_fake
def _gather_tokens_fake(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_gather_inputs(x, index)
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


def _gather_tokens_setup(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.x_shape = x.shape


def _gather_tokens_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    (index,) = ctx.saved_tensors
    B, K, D = grad.shape
    # Repeated indices accumulate, as the gradient of a gather must.
    grad_x = grad.new_zeros(ctx.x_shape).scatter_add_(1, index.long().unsqueeze(-1).expand(B, K, D), grad)
    return grad_x, None


_gather_tokens_op.register_autograd(_gather_tokens_backward, setup_context=_gather_tokens_setup)


@torch.library.custom_op("vtprune::compact_kv_stacked", mutates_args=())
def _compact_kv_op(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    # One stacked output rather than a list: custom-op outputs may not alias each other, and compact_kv returns
    # per-layer views of one buffer (one allocation for a whole stage).
    return _compact_kv_impl(caches, index)


@_compact_kv_op.register_fake
def _compact_kv_fake(caches: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    _check_kv_inputs(caches, index)
    B, H, _, Dh = caches[0].shape
    return caches[0].new_empty((len(caches), B, H, index.shape[1], Dh))


def _compact_kv_setup(ctx: Any, inputs: tuple[list[torch.Tensor], torch.Tensor], output: torch.Tensor) -> None:
    caches, index = inputs
    ctx.save_for_backward(index)
    ctx.cache_shape = caches[0].shape
    ctx.needs = [c.requires_grad for c in caches]


def _compact_kv_backward(ctx: Any, grad: torch.Tensor) -> tuple[list[torch.Tensor | None], None]:
    (index,) = ctx.saved_tensors
    _, B, H, K, Dh = grad.shape
    idx = index.long()[:, None, :, None].expand(B, H, K, Dh)
    grads = [
        grad.new_zeros(ctx.cache_shape).scatter_add_(2, idx, grad[layer]) if need else None
        for layer, need in enumerate(ctx.needs)
    ]
    return grads, None


_compact_kv_op.register_autograd(_compact_kv_backward, setup_context=_compact_kv_setup)


def _use_op(*tensors: torch.Tensor) -> bool:
    # The custom op is needed for tracing (torch.compile) and for autograd (the Triton path is not differentiable by
    # itself); plain inference calls skip its dispatch overhead.
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather tokens: ``x[B, N, D]``, ``index[B, K]`` -> contiguous ``out[B, K, D]``, ``out[b, k] = x[b, index[b, k]]``.

    Any dtype and any strides of ``x`` (no copy is made of it); ``index`` is int32 or int64 with values in
    ``[0, N)``, kept in its order (unsorted and repeated indices are fine); ``K`` may be 0. The Triton path does not
    bounds-check indices (see the module docstring).
    """
    if _use_op(x):
        return torch.ops.vtprune.gather_tokens(x, index)
    return _gather_tokens_impl(x, index)


def compact_kv(cache: CacheT, index: torch.Tensor) -> CacheT:
    """Keep positions ``index`` of KV caches laid out ``[B, H, S, Dh]``, for every head.

    ``cache`` is one tensor or a list/tuple of tensors of one shape, dtype and device (e.g. every layer's K and V
    of a stage); ``index[B, K]`` (int32/int64, values in ``[0, S)``) selects along ``S``:
    ``out[b, h, k] = cache[b, h, index[b, k]]``. Returns the same structure with ``[B, H, K, Dh]`` tensors. A list is
    gathered in one kernel launch into one buffer; the returned tensors are contiguous views of it.
    """
    if isinstance(cache, torch.Tensor):
        caches = [cache]
    elif isinstance(cache, (list, tuple)):
        if len(cache) == 0:
            return type(cache)()
        caches = list(cache)
    else:
        raise TypeError(f"compact_kv: cache must be a tensor or a list/tuple of tensors, got {type(cache).__name__}")
    if _use_op(*caches):
        stacked = torch.ops.vtprune.compact_kv_stacked(caches, index)
    else:
        stacked = _compact_kv_impl(caches, index)
    if isinstance(cache, torch.Tensor):
        return stacked[0]
    return type(cache)(stacked.unbind(0))
