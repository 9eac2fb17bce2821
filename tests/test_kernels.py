"""vtprune.kernels: Triton kernel == torch reference (exactly), dispatch rules, input errors, torch.compile.

CPU only: the Triton kernel runs under the Triton interpreter, which reads TRITON_INTERPRET when the kernel is
decorated, so it is set before vtprune.kernels.triton_gather is first imported (tests/conftest.py does the same).
Shapes are small because the interpreter runs each program in Python.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import vtprune.kernels as kernels  # noqa: E402
import vtprune.kernels.triton_gather as tg  # noqa: E402
from vtprune.kernels import compact_kv, gather_tokens, kernel_backend, reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------------------------


def naive_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Independent oracle: a Python loop over rows."""
    B, K = index.shape
    out = torch.empty((B, K, x.shape[2]), dtype=x.dtype)
    for b in range(B):
        for k in range(K):
            out[b, k] = x[b, int(index[b, k])]
    return out


def naive_kv(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.stack([cache[b][:, index[b].long()] for b in range(cache.shape[0])])


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g).to(dtype)


def rand_index(B: int, N: int, K: int, dtype: torch.dtype = torch.int64, seed: int = 1) -> torch.Tensor:
    """Unsorted, possibly repeated indices."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, N, (B, K), generator=g).to(dtype)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records every Triton launch (so a test can tell the kernel really ran, and how often)."""
    calls: list[dict] = []
    original = tg._launch

    def spy(x0, index, out, L, strides5, layer_offsets, layer_align):
        calls.append({"L": L, "table": layer_offsets is not None, "strides": strides5})
        return original(x0, index, out, L, strides5, layer_offsets, layer_align)

    monkeypatch.setattr(tg, "_launch", spy)
    return calls


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch, launches: list[dict]) -> list[dict]:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "triton")
    return launches


def test_kernel_module_runs_under_the_interpreter() -> None:
    # Everything below that runs the Triton path on CPU depends on this.
    assert tg.INTERPRETED, "TRITON_INTERPRET=1 must be set before vtprune.kernels.triton_gather is imported"


def test_import_vtprune_kernels_does_not_import_triton() -> None:
    code = "import sys, vtprune.kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ------------------------------------------------------------------------------------------------------------------
# gather_tokens: Triton (interpreter) == reference == naive loop
# ------------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]

# (B, N, D, K): odd D, D spanning several BLOCK_D blocks with a tail, K = 1, K = N, K = 0, K > N (repeats),
# K spanning several BLOCK_K blocks with a tail, D == BLOCK_D (unmasked EVEN_D path), D = 1.
SHAPES = [
    (2, 17, 33, 5),
    (3, 9, 65, 9),
    (2, 12, 33, 1),
    (2, 11, 16, 0),
    (1, 6, 64, 20),
    (2, 100, 600, 70),
    (1, 40, 512, 24),
    (2, 7, 1, 4),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_gather_triton_equals_reference_dtypes(triton_backend: list[dict], dtype: torch.dtype, index_dtype) -> None:
    x = make((2, 19, 33), dtype)
    index = rand_index(2, 19, 8, index_dtype)
    out = gather_tokens(x, index)
    assert len(triton_backend) == 1
    ref = reference.gather_tokens(x, index)
    assert out.dtype == dtype and out.shape == (2, 8, 33) and out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(ref, naive_gather(x, index))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_D{}_K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gather_triton_equals_reference_shapes(triton_backend: list[dict], shape, dtype: torch.dtype) -> None:
    B, N, D, K = shape
    x = make((B, N, D), dtype)
    index = rand_index(B, N, K, torch.int32)
    out = gather_tokens(x, index)
    assert len(triton_backend) == 1
    assert out.shape == (B, K, D) and out.is_contiguous()
    assert torch.equal(out, reference.gather_tokens(x, index))
    assert torch.equal(out, naive_gather(x, index))


def test_gather_full_permutation_and_identity(triton_backend: list[dict]) -> None:
    x = make((2, 23, 40), torch.bfloat16)
    perm = torch.stack([torch.randperm(23, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    assert torch.equal(gather_tokens(x, perm), naive_gather(x, perm))
    ident = torch.arange(23).expand(2, 23)  # stride-0 batch dim of the index
    assert torch.equal(gather_tokens(x, ident), x)


def test_gather_preserves_index_order(triton_backend: list[dict]) -> None:
    x = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 3)
    index = torch.tensor([[7, 2, 2, 9, 0]])
    assert gather_tokens(x, index)[0, :, 0].tolist() == [7.0, 2.0, 2.0, 9.0, 0.0]


def _non_contiguous_views() -> dict[str, torch.Tensor]:
    base = make((4, 30, 70), torch.float16)
    return {
        "transposed": make((2, 33, 25), torch.float16).transpose(1, 2),  # [2, 25, 33], stride_d = 25
        "sliced": base[:, 3:28:2, 5:70],  # row stride 140, odd D = 65, storage offset
        "batch_strided": base[::2],
        "expanded": make((1, 25, 33), torch.float16).expand(3, 25, 33),  # stride_b = 0
    }


@pytest.mark.parametrize("name", list(_non_contiguous_views()))
def test_gather_non_contiguous_x(triton_backend: list[dict], name: str) -> None:
    x = _non_contiguous_views()[name]
    assert not x.is_contiguous()
    B, N, _ = x.shape
    index = rand_index(B, N, 11)
    out = gather_tokens(x, index)
    assert len(triton_backend) == 1
    assert out.is_contiguous()
    assert torch.equal(out, reference.gather_tokens(x, index))
    assert torch.equal(out, naive_gather(x, index))


def test_gather_does_not_copy_x(triton_backend: list[dict]) -> None:
    x = make((2, 33, 25), torch.float32).transpose(1, 2)
    gather_tokens(x, rand_index(2, 25, 4))
    # The kernel got the strides of the view itself (stride_xd = 25), not a contiguous copy.
    assert triton_backend[0]["strides"] == (0, x.stride(0), 0, x.stride(1), x.stride(2))


def test_gather_non_contiguous_index(triton_backend: list[dict]) -> None:
    x = make((3, 15, 20), torch.float32)
    index = rand_index(9, 15, 3, torch.int32).t()  # [3, 9] with strides (1, 3)
    assert not index.is_contiguous()
    assert torch.equal(gather_tokens(x, index), naive_gather(x, index))


def test_gather_bit_exact_for_special_floats(triton_backend: list[dict]) -> None:
    x = torch.tensor([[[float("nan"), -0.0], [float("inf"), -float("inf")], [1e-45, 3.0]]])
    index = torch.tensor([[2, 0, 1]])
    out = gather_tokens(x, index)
    assert torch.equal(out.view(torch.int32), naive_gather(x, index).view(torch.int32))


# ------------------------------------------------------------------------------------------------------------------
# compact_kv
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compact_kv_single_tensor(triton_backend: list[dict], dtype: torch.dtype) -> None:
    cache = make((2, 3, 19, 16), dtype)
    index = rand_index(2, 19, 7, torch.int32)
    out = compact_kv(cache, index)
    assert len(triton_backend) == 1
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 7, 16) and out.is_contiguous()
    assert torch.equal(out, naive_kv(cache, index))
    assert torch.equal(out, reference.compact_kv_stacked([cache], index)[0])


def test_compact_kv_list_of_layers_one_launch(triton_backend: list[dict]) -> None:
    # 3 layers x (K, V), separate allocations: one launch through the per-layer offset table.
    caches = [make((2, 4, 21, 8), torch.float16, seed=s) for s in range(6)]
    index = rand_index(2, 21, 9)
    out = compact_kv(caches, index)
    assert triton_backend == [{"L": 6, "table": True, "strides": (0, *caches[0].stride())}]
    assert isinstance(out, list) and len(out) == 6
    for cache, o in zip(caches, out):
        assert o.shape == (2, 4, 9, 8) and o.is_contiguous()
        assert torch.equal(o, naive_kv(cache, index))


def test_compact_kv_stacked_views_use_layer_stride(triton_backend: list[dict]) -> None:
    stacked = make((5, 2, 3, 17, 12), torch.bfloat16)
    caches = tuple(stacked.unbind(0))
    index = rand_index(2, 17, 17)  # K = S, repeated indices
    out = compact_kv(caches, index)
    assert triton_backend == [{"L": 5, "table": False, "strides": stacked.stride()}]
    assert isinstance(out, tuple) and len(out) == 5
    for cache, o in zip(caches, out):
        assert torch.equal(o, naive_kv(cache, index))
    # the same tensor twice (K and V sharing storage): layer stride 0
    out = compact_kv([caches[1], caches[1]], index)
    assert triton_backend[-1]["strides"][0] == 0
    assert torch.equal(out[0], naive_kv(caches[1], index)) and torch.equal(out[1], out[0])


def test_compact_kv_mixed_strides_and_non_contiguous(triton_backend: list[dict]) -> None:
    # HF-style [B, S, H, Dh] storage seen as [B, H, S, Dh], mixed with a contiguous cache: one launch each.
    a = make((2, 15, 3, 10), torch.float32).transpose(1, 2)
    b = make((2, 3, 15, 10), torch.float32, seed=3)
    index = rand_index(2, 15, 6, torch.int32)
    out = compact_kv([a, b], index)
    assert len(triton_backend) == 2
    assert torch.equal(out[0], naive_kv(a, index)) and torch.equal(out[1], naive_kv(b, index))


def test_compact_kv_reference_matches_naive(monkeypatch: pytest.MonkeyPatch, launches: list[dict]) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "torch")
    caches = [make((3, 2, 11, 5), torch.float16, seed=s) for s in range(4)]
    index = rand_index(3, 11, 4, torch.int32)
    out = compact_kv(caches, index)
    assert launches == []
    assert all(torch.equal(o, naive_kv(c, index)) for c, o in zip(caches, out))


def test_compact_kv_empty_and_zero_k(triton_backend: list[dict]) -> None:
    assert compact_kv([], torch.zeros(2, 3, dtype=torch.long)) == []
    assert compact_kv((), torch.zeros(2, 3, dtype=torch.long)) == ()
    out = compact_kv([make((2, 3, 5, 4), torch.float16)] * 2, torch.zeros(2, 0, dtype=torch.long))
    assert [o.shape for o in out] == [(2, 3, 0, 4)] * 2


# ------------------------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------------------------


def test_auto_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch, launches: list[dict]) -> None:
    monkeypatch.delenv("VTPRUNE_KERNEL_BACKEND", raising=False)
    calls: list[int] = []
    original = reference.gather_tokens
    monkeypatch.setattr(reference, "gather_tokens", lambda x, i: calls.append(1) or original(x, i))
    x, index = make((2, 9, 6), torch.float32), rand_index(2, 9, 3)
    assert torch.equal(gather_tokens(x, index), naive_gather(x, index))
    compact_kv(make((2, 1, 9, 4), torch.float32), index)
    assert calls == [1] and launches == []


def test_explicit_torch_backend(monkeypatch: pytest.MonkeyPatch, launches: list[dict]) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "torch")
    x, index = make((2, 9, 6), torch.float16), rand_index(2, 9, 3)
    assert torch.equal(gather_tokens(x, index), naive_gather(x, index))
    assert launches == []
    assert kernel_backend() == "torch"


def test_explicit_triton_runs_kernel_on_cpu_under_interpreter(triton_backend: list[dict]) -> None:
    x, index = make((2, 9, 6), torch.float16), rand_index(2, 9, 3)
    gather_tokens(x, index)
    assert len(triton_backend) == 1
    assert kernel_backend() == "triton"


def test_triton_without_interpreter_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "triton")
    with pytest.raises(RuntimeError) as err:
        kernels.check_triton_usable(torch.device("cpu"), interpret=False)
    msg = str(err.value)
    # what was requested, why it cannot be met, what to do
    assert "VTPRUNE_KERNEL_BACKEND='triton'" in msg and "CPU" in msg
    assert "TRITON_INTERPRET=1" in msg and "CUDA" in msg and "VTPRUNE_KERNEL_BACKEND=auto" in msg
    # the same error through the public API when the interpreter is not active
    monkeypatch.setattr(kernels, "_interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gather_tokens(make((1, 4, 4), torch.float32), rand_index(1, 4, 2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compact_kv(make((1, 2, 4, 4), torch.float32), rand_index(1, 4, 2))
    kernels.check_triton_usable(torch.device("cuda"), interpret=False)  # a GPU needs no interpreter


def test_triton_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        gather_tokens(make((1, 4, 4), torch.float32), rand_index(1, 4, 2))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        kernel_backend()
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "auto")
    assert kernel_backend() == "torch"


def test_triton_on_unsupported_device_raises() -> None:
    with pytest.raises(RuntimeError, match="only CUDA"):
        kernels.check_triton_usable(torch.device("meta"), interpret=True)


def test_auto_decision_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "auto")
    cuda = torch.device("cuda")
    # Interpreter active (as in this session): auto must not pick the interpreted kernel for a GPU.
    assert kernels._choose(cuda, torch.float16) is None
    assert kernel_backend() == "torch"
    monkeypatch.setattr(kernels, "_interpreter_active", lambda: False)
    assert kernels._choose(cuda, torch.float16) is tg
    assert kernels._choose(cuda, torch.complex128) is None  # 16-byte elements: reference
    assert kernels._choose(torch.device("cpu"), torch.float16) is None
    assert kernel_backend() == "triton"


def test_unsupported_dtype(triton_backend: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 5, 3, dtype=torch.complex128)
    index = torch.tensor([[4, 0]])
    with pytest.raises(TypeError, match="complex128"):
        gather_tokens(x, index)
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "auto")
    assert torch.equal(gather_tokens(x, index), naive_gather(x, index))


@pytest.mark.parametrize("value", ["cuda", "tritonn", "1"])
def test_bad_backend_env_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", value)
    match = f"VTPRUNE_KERNEL_BACKEND='{value}'.*auto, triton, torch"
    with pytest.raises(ValueError, match=match):
        gather_tokens(make((1, 4, 4), torch.float32), rand_index(1, 4, 2))
    with pytest.raises(ValueError, match=match):
        kernel_backend()


def test_backend_env_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", " Torch ")
    assert kernel_backend() == "torch"


# ------------------------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("x", "index", "exc", "match"),
    [
        (torch.zeros(4, 4), torch.zeros(1, 2, dtype=torch.long), ValueError, r"x must be 3-D \[B, N, D\]"),
        (torch.zeros(1, 4, 4), torch.zeros(2, dtype=torch.long), ValueError, r"index must be 2-D \[B, K\]"),
        (torch.zeros(1, 4, 4), torch.zeros(1, 2), TypeError, "int32 or int64, got torch.float32"),
        (torch.zeros(1, 4, 4), torch.zeros(1, 2, dtype=torch.int16), TypeError, "int32 or int64"),
        (torch.zeros(2, 4, 4), torch.zeros(3, 2, dtype=torch.long), ValueError, "batch mismatch"),
        (torch.zeros(1, 4, 4), torch.zeros(1, 2, dtype=torch.long, device="meta"), ValueError, "one device"),
        (torch.zeros(1, 0, 4), torch.zeros(1, 2, dtype=torch.long), IndexError, "N=0"),
        ([[1.0]], torch.zeros(1, 2, dtype=torch.long), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_gather_bad_inputs(monkeypatch: pytest.MonkeyPatch, backend: str, x, index, exc, match) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", backend)
    with pytest.raises(exc, match=match):
        gather_tokens(x, index)


def test_compact_kv_bad_inputs() -> None:
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"4-D \[B, H, S, Dh\]"):
        compact_kv(torch.zeros(2, 5, 4), idx)
    with pytest.raises(ValueError, match="share shape, dtype and device"):
        compact_kv([torch.zeros(2, 2, 5, 4), torch.zeros(2, 3, 5, 4)], idx)
    with pytest.raises(ValueError, match="share shape, dtype and device"):
        compact_kv([torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 4, dtype=torch.float16)], idx)
    with pytest.raises(ValueError, match="batch mismatch"):
        compact_kv(torch.zeros(3, 2, 5, 4), idx)
    with pytest.raises(TypeError, match="list/tuple"):
        compact_kv({"k": torch.zeros(2, 2, 5, 4)}, idx)
    with pytest.raises(TypeError, match="cache 1 must be a torch.Tensor"):
        compact_kv([torch.zeros(2, 2, 5, 4), None], idx)


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("bad", [5, -1])
def test_reference_raises_on_out_of_range_index(monkeypatch: pytest.MonkeyPatch, B: int, bad: int) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "torch")
    index = torch.zeros(B, 2, dtype=torch.long)
    index[-1, 1] = bad  # in the last batch row: must not alias into another row
    with pytest.raises((IndexError, RuntimeError)):
        gather_tokens(torch.zeros(B, 5, 3), index)
    with pytest.raises((IndexError, RuntimeError)):
        compact_kv(torch.zeros(B, 2, 5, 3), index)
    # the CUDA formulation of the reference (torch.gather), run on CPU
    with pytest.raises((IndexError, RuntimeError)):
        reference._gather_tokens_batched(torch.zeros(B, 5, 3), index)
    with pytest.raises((IndexError, RuntimeError)):
        reference._compact_kv_batched([torch.zeros(B, 2, 5, 3)], index)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_reference_cuda_formulation_matches(index_dtype: torch.dtype) -> None:
    # The CUDA branch of the reference (one torch.gather per tensor) can only be run here on CPU tensors.
    x = _non_contiguous_views()["sliced"]
    index = rand_index(x.shape[0], x.shape[1], 9, index_dtype)
    assert torch.equal(reference._gather_tokens_batched(x, index), naive_gather(x, index))
    caches = [make((3, 2, 11, 5), torch.bfloat16, seed=s) for s in range(3)]
    index = rand_index(3, 11, 6, index_dtype)
    out = reference._compact_kv_batched(caches, index)
    assert all(torch.equal(o, naive_kv(c, index)) for c, o in zip(caches, out))


def test_debug_check_on_triton_path(triton_backend: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_DEBUG", "1")
    with pytest.raises(IndexError, match=r"\[0, 5\).*max 5"):
        gather_tokens(torch.zeros(1, 5, 3), torch.tensor([[0, 5]]))
    with pytest.raises(IndexError, match=r"min -2"):
        compact_kv(torch.zeros(1, 2, 5, 3), torch.tensor([[-2, 1]]))
    assert triton_backend == []  # checked before launching


# ------------------------------------------------------------------------------------------------------------------
# torch.compile and autograd through the custom ops
# ------------------------------------------------------------------------------------------------------------------


def _compile(fn, graphs: list[torch.fx.GraphModule]):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        # aot_eager rather than inductor: it still runs the fake kernels and functionalization, but the inductor
        # C++ toolchain needs ~30 s cold on this CPU box, which would blow the test-time budget.
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_gather(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", backend)

    def fn(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return gather_tokens(x * 2, index).sum(-1)

    graphs: list[torch.fx.GraphModule] = []
    compiled = _compile(fn, graphs)
    x, index = make((2, 13, 10), torch.float32), rand_index(2, 13, 5)
    assert torch.equal(compiled(x, index), naive_gather(x * 2, index).sum(-1))
    assert len(graphs) == 1  # fullgraph: a graph break would have raised
    assert "vtprune.gather_tokens" in str(graphs[0].graph)


def test_torch_compile_fullgraph_compact_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", "torch")

    def fn(caches: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        return [c + 1 for c in compact_kv(caches, index)]

    graphs: list[torch.fx.GraphModule] = []
    compiled = _compile(fn, graphs)
    caches = [make((2, 3, 9, 4), torch.float32, seed=s) for s in range(4)]
    index = rand_index(2, 9, 5, torch.int32)
    out = compiled(caches, index)
    assert all(torch.equal(o, naive_kv(c, index) + 1) for c, o in zip(caches, out))
    assert "vtprune.compact_kv_stacked" in str(graphs[0].graph)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_flow(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setenv("VTPRUNE_KERNEL_BACKEND", backend)
    x = make((2, 6, 3), torch.float64).requires_grad_()
    index = torch.tensor([[5, 1, 1], [0, 2, 4]])  # repeated index: gradients accumulate
    assert torch.autograd.gradcheck(lambda t: gather_tokens(t, index), (x,))
    caches = [make((2, 2, 6, 3), torch.float64, seed=s).requires_grad_() for s in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: tuple(compact_kv([a, b], index)), tuple(caches))


# ------------------------------------------------------------------------------------------------------------------
# the GPU build of the kernel (no GPU needed: Triton compiles to PTX/cubin for sm_90 on CPU with its bundled ptxas)
# ------------------------------------------------------------------------------------------------------------------


def _compile_for_h100(use_table: bool, even_d: bool, block_k: int, block_d: int, num_warps: int) -> str:
    """PTX of the kernel for sm_90, specialised as Triton's launcher would for contiguous fp16/bf16 tensors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # Under TRITON_INTERPRET=1 the module holds an InterpretedFunction; compile the same Python function for real.
    fn = JITFunction(tg._gather_rows_kernel.fn)
    names = fn.arg_names
    constexprs = {"USE_OFFSET_TABLE": use_table, "LAYER_ALIGN": 8, "BLOCK_K": block_k, "BLOCK_D": block_d,
                  "EVEN_D": even_d, "stride_xd": 1, "stride_ik": 1}  # fmt: skip  # ints == 1 become constexpr
    signature = {n: "constexpr" if n in constexprs else "*i64" if n.endswith("_ptr") else "i32" for n in names}
    signature.update(x_ptr="*i16", out_ptr="*i16")
    # The launcher marks pointers and ints divisible by 16 (D = 4096, row strides) with tt.divisibility = 16.
    aligned = ("x_ptr", "idx_ptr", "out_ptr", "layer_off_ptr", "D", "stride_xl", "stride_xb", "stride_xh", "stride_xn")
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": False}
    ).asm["ptx"]


# Real shapes, with the tiles _tile() picks for them on a GPU: (K, D, row sets = L*B*H, use_table)
GPU_CASES = {
    "llava_B1_K144": (144, 4096, 1, False),
    "llava_next_B8_K640": (640, 4096, 8, False),
    "llava_kv_64x32heads_K204": (204, 128, 64 * 32, True),
    "qwen_kv_56x4heads_K360_stacked": (360, 128, 56 * 4, False),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_build_uses_128_bit_loads_and_stores(case: str) -> None:
    K, D, rows_total, use_table = GPU_CASES[case]
    block_k, block_d, num_warps = tg._tile(K, D, 2, rows_total, interpreted=False)
    ptx = _compile_for_h100(use_table, D % block_d == 0, block_k, block_d, num_warps)
    # Each thread moves its share of the fp16 tile as 16-byte vectors (v4 x b32): near-copy bandwidth needs that.
    per_thread = max(1, block_k * block_d * 2 // (32 * num_warps * 16))
    assert len(re.findall(r"ld\.global[.\w]*\.v4\.b32", ptx)) == per_thread, (block_k, block_d, num_warps)
    assert len(re.findall(r"st\.global[.\w]*\.v4\.b32", ptx)) == per_thread, (block_k, block_d, num_warps)
