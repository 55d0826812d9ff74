"""The compiled grouped adapter op (csrc/: C++ on CPU, CUDA on GPUs) against the loop oracle: forward and every
gradient on awkward shapes and routings, fp64 gradcheck, bf16/fp16 with accumulation in fp32, the op's
registration (schema, fake tensors, autograd) under opcheck and torch.compile, and the build's fallback.

CUDA cases carry the ``gpu`` marker and skip without a GPU; everything else runs wherever the C++ extension
builds (CI builds it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from grouped_inputs import CASES, GRAD_NAMES, errors_against_loop, make_inputs, rounded, run

from alter_ds.ops import grouped_adapter, grouped_adapter_loop
from alter_ds.ops.build import cuda_buildable, load_cuda_extension, load_extension
from alter_ds.ops.grouped_adapter import ACTIVATIONS, IMPLEMENTATION_ENV
from alter_ds.ops.kernels import has_kernel

REPO = Path(__file__).resolve().parents[1]

KERNEL_CASES = {
    **CASES,
    "experts_without_tokens": dict(n=5, d=4, r=2, experts=6, k=1, ids=torch.tensor([[0], [0], [3], [3], [3]])),
    "all_on_one_expert": dict(n=40, d=9, r=3, experts=4, k=1, ids=torch.full((40, 1), 2)),
    "unsorted_k2": dict(n=5, d=5, r=3, experts=4, k=2, ids=torch.tensor([[3, 0], [1, 2], [0, 3], [2, 2], [1, 0]])),
    "one_token_segments": dict(n=6, d=10, r=2, experts=6, k=1, ids=torch.tensor([[5], [2], [0], [4], [1], [3]])),
    "many_chunks": dict(n=2500, d=24, r=4, experts=3, k=2),  # segments longer than one 1024-row chunk
}


def _device_params():
    gpu = pytest.mark.gpu
    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernel tests need a CUDA GPU")
    return [pytest.param("cpu", id="cpp"), pytest.param("cuda", id="cuda", marks=[gpu, no_cuda])]


@pytest.fixture(params=_device_params())
def device(request, monkeypatch):
    if not load_extension():
        pytest.fail("the extension did not build: see the RuntimeWarning (a C++ compiler and ninja are needed)")
    if request.param == "cuda":
        if not cuda_buildable():
            pytest.skip("the CUDA kernels need nvcc (CUDA_HOME) and a CUDA build of torch")
        if not load_cuda_extension():
            pytest.fail("the CUDA kernels did not build: see the RuntimeWarning")
    assert has_kernel(request.param)
    monkeypatch.setenv(IMPLEMENTATION_ENV, "cpp" if request.param == "cpu" else "cuda")
    return request.param


def on(device, tensors):
    return [t.to(device) if t is not None else None for t in tensors]


def assert_matches_oracle(device, tensors, act, rtol, atol):
    """Kernel in the inputs' dtype against the loop oracle in float64 on the same values."""
    y, grads = run(grouped_adapter, on(device, tensors), act)
    exact = [t.double() if t is not None and t.is_floating_point() else t for t in tensors]
    y_ref, grads_ref = run(grouped_adapter_loop, exact, act)
    assert y.dtype == tensors[0].dtype
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=rtol, atol=atol)
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        if want is None:
            assert got is None, name
            continue
        assert got is not None and got.dtype == tensors[GRAD_NAMES.index(name)].dtype, name
        torch.testing.assert_close(
            got.cpu().double(), want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}"
        )


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_loop_in_float64(device, case, activation):
    tensors, act = make_inputs(**KERNEL_CASES[case], activation=activation, dtype=torch.float64)
    assert_matches_oracle(device, tensors, act, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d_out", [3, 17])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["identity", "swiglu"])
def test_the_cpp_kernel_takes_experts_that_change_the_width(monkeypatch, d_out, bias, activation):
    """LoRA experts on a narrowing (k, v, down) or widening (up, fused qkv) projection, float64 and float32,
    every gradient, against the loop; and a gradcheck. (The CUDA kernels keep d_out = d: such experts run on the
    reference there.)"""
    if not load_extension():
        pytest.fail("the extension did not build: see the RuntimeWarning (a C++ compiler and ninja are needed)")
    monkeypatch.setenv(IMPLEMENTATION_ENV, "cpp")
    case = dict(n=2500, d=6, r=3, experts=4, k=2, activation=activation, bias=bias, d_out=d_out)  # several chunks
    tensors, act = make_inputs(**case, dtype=torch.float64)
    assert_matches_oracle("cpu", tensors, act, rtol=1e-10, atol=1e-10)
    tensors, act = make_inputs(**case, dtype=torch.float32)
    # a weight gradient sums ~1,250 fp32 products in an order set by the thread chunks: n·eps ≈ 7.5e-5 relative
    # at worst (1e-5 failed once by 2.5e-4 on a gradient of ~10), as in the fp32 test below
    assert_matches_oracle("cpu", tensors, act, rtol=1e-4, atol=1e-4)
    small, act = make_inputs(**dict(case, n=7), dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in small]
    assert torch.autograd.gradcheck(lambda *a: grouped_adapter(*a, act), tuple(leaves), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_loop_in_float32(device, case):
    # fp32 rounding of sums over up to 5000 rows (weight gradients of many_chunks): 1e-4 relative covers it
    tensors, act = make_inputs(**KERNEL_CASES[case], activation="gelu", dtype=torch.float32)
    assert_matches_oracle(device, tensors, act, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_half_precision_accumulates_in_float32(device, dtype, activation):
    """Inputs rounded to bf16/fp16, then compared with the fp64 oracle on the same rounded values: what is left
    is the rounding of the outputs and of the pre-activation, not of sums over 3000 tokens (bias gradients sum
    over every token of an expert; summed in bf16 they would be off by several percent)."""
    tensors, act = make_inputs(n=3000, d=40, r=8, experts=4, k=2, activation=activation, dtype=torch.float64)
    errors = errors_against_loop(grouped_adapter, on(device, rounded(tensors, dtype)), act)
    for name, error in errors.items():
        assert error < 1e-2, f"{name}: max error {error:.2e} of the largest value"


def test_no_tokens_gives_an_empty_output_and_zero_weight_gradients(device):
    tensors, act = make_inputs(n=0, d=8, r=2, experts=3, k=1, dtype=torch.float32)
    y, grads = run(grouped_adapter, on(device, tensors), act)
    assert y.shape == (0, 8)
    for name, grad, tensor in zip(GRAD_NAMES, grads, tensors):
        if name != "ids":
            assert grad is not None and grad.shape == tensor.shape and not grad.any(), name


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "silu"])
def test_gradcheck_float64(device, activation):
    tensors, act = make_inputs(n=7, d=5, r=2, experts=3, k=2, activation=activation)
    leaves = tuple(t.to(device).requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors)
    assert torch.autograd.gradcheck(lambda *a: grouped_adapter(*a, act), leaves, eps=1e-6, atol=1e-7)


def test_opcheck_schema_fake_and_autograd_registration(device):
    tensors, act = make_inputs(n=9, d=6, r=3, experts=3, k=2, activation="geglu", dtype=torch.float32)
    leaves = [t.to(device).requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    torch.library.opcheck(torch.ops.alter_ds.grouped_adapter.default, (*leaves, act))
    no_bias = list(leaves)
    no_bias[4] = no_bias[6] = None
    torch.library.opcheck(torch.ops.alter_ds.grouped_adapter.default, (*no_bias, act))


def test_torch_compile_matches_eager(device):
    tensors, act = make_inputs(n=20, d=8, r=4, experts=4, k=2, activation="swiglu", dtype=torch.float32)

    def op(x, ids, weights, w_down, b_down, w_up, b_up):
        return torch.ops.alter_ds.grouped_adapter(x, ids, weights, w_down, b_down, w_up, b_up, act)[0].tanh()

    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    y, grads = run(lambda *a: compiled(*a[:-1]), on(device, tensors), act)
    y_eager, grads_eager = run(lambda *a: op(*a[:-1]), on(device, tensors), act)
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, grads_eager):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)


def test_the_kernel_is_the_path_taken_when_forced(device, monkeypatch):
    tensors, act = make_inputs(n=4, d=4, r=2, experts=2, k=1, dtype=torch.float32)
    leaves = [t.to(device).requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    assert "alter_ds_grouped_adapter" in type(grouped_adapter(*leaves, act).grad_fn).__name__
    monkeypatch.setenv(IMPLEMENTATION_ENV, "reference")
    assert "alter_ds" not in type(grouped_adapter(*leaves, act).grad_fn).__name__
    monkeypatch.setenv(IMPLEMENTATION_ENV, "cuda" if device == "cpu" else "cpp")
    with pytest.raises(ValueError, match="runs on"):
        grouped_adapter(*leaves, act)


def test_the_kernel_rejects_ids_out_of_range_itself(device):
    """The Python wrapper checks first; the op called directly must still refuse, not read out of bounds."""
    tensors, act = make_inputs(n=3, d=4, r=2, experts=2, k=1, ids=torch.tensor([[0], [2], [1]]), dtype=torch.float32)
    if device == "cuda":
        pytest.skip("an out-of-range id on CUDA is a device-side assertion, which poisons the CUDA context")
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.alter_ds.grouped_adapter(*on(device, tensors), act)


def test_a_failed_build_warns_once_and_falls_back_to_the_reference(tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    script = textwrap.dedent(
        f"""
        import warnings
        from pathlib import Path
        import torch
        import alter_ds.ops.build as build
        from alter_ds.ops import grouped_adapter, grouped_adapter_reference
        build.CPP_SOURCES = [Path({str(broken)!r})]
        x = torch.randn(5, 4); ids = torch.tensor([[0], [1], [1], [0], [1]]); w = torch.ones(5, 1)
        wd, wu = torch.randn(2, 4, 3), torch.randn(2, 3, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = grouped_adapter(x, ids, w, wd, None, wu, None, "relu")
            grouped_adapter(x, ids, w, wd, None, wu, None, "relu")
        messages = [str(c.message) for c in caught if "grouped adapter extension" in str(c.message)]
        assert len(messages) == 1, messages
        assert "PyTorch reference runs instead" in messages[0], messages[0]
        assert torch.equal(y, grouped_adapter_reference(x, ids, w, wd, None, wu, None, "relu"))
        print("fallback ok")
        """
    )
    env = dict(os.environ, ALTER_DS_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(REPO))
    env.pop(IMPLEMENTATION_ENV, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-3000:]


GPU_SHAPES = {
    "tensor_core_r16": dict(n=3000, d=4096, r=16, experts=16, k=1),
    "tensor_core_k2_r64": dict(n=1000, d=512, r=64, experts=8, k=2),
    "tensor_core_r17": dict(n=700, d=256, r=17, experts=4, k=1),
    "generic_d_4100": dict(n=700, d=4100, r=16, experts=4, k=1),
    "one_hot_expert": dict(n=2000, d=1024, r=16, experts=4, k=1, ids=torch.zeros(2000, 1, dtype=torch.long)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu"])
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
@pytest.mark.parametrize("path", ["tensor_core_or_generic", "generic"])
def test_cuda_paths_in_bfloat16_at_model_widths(device, monkeypatch, shape, activation, path):
    """The tensor-core path (bf16, d % 8 == 0, r <= 64) and the generic kernels (ALTER_DS_CUDA_GENERIC=1)
    against the fp64 oracle at the widths models use; fp32 expert weights with bf16 x, as routers produce."""
    if device != "cuda":
        pytest.skip("the CUDA kernels' paths")
    if path == "generic":
        monkeypatch.setenv("ALTER_DS_CUDA_GENERIC", "1")
    tensors, act = make_inputs(**GPU_SHAPES[shape], activation=activation, dtype=torch.float64)
    low = rounded(tensors, torch.bfloat16, weights_dtype=torch.float32)
    errors = errors_against_loop(grouped_adapter, on(device, low), act)
    for name, error in errors.items():
        assert error < 1e-2, f"{name}: max error {error:.2e} of the largest value"


@pytest.mark.parametrize("case", ["k2", "experts_without_tokens", "many_chunks"])
def test_a_router_only_backward_skips_the_expert_weight_gradients(device, case):
    """With frozen experts (a router-only stage) autograd asks for no expert-weight gradient: the op skips them
    (empty tensors from the kernel, None to autograd) and grad_x and the mixture's gradient are unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class BackwardCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.weight_grads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "grouped_adapter_backward" in str(func):
                self.weight_grads.append(args[-1] if len(args) > 10 else kwargs.get("weight_grads", True))
            return func(*args, **(kwargs or {}))

    tensors, act = make_inputs(**KERNEL_CASES[case], activation="gelu", dtype=torch.float32)
    tensors = on(device, tensors)
    x, ids, weights, w_down, b_down, w_up, b_up = tensors
    full = torch.ops.alter_ds.grouped_adapter_backward
    y, hidden = torch.ops.alter_ds.grouped_adapter(*tensors, act)
    grad_y = torch.randn_like(y)
    every = full(grad_y, *tensors, hidden, act)
    skipped = full(grad_y, *tensors, hidden, act, False)
    for index in (0, 1):
        torch.testing.assert_close(skipped[index], every[index], rtol=0, atol=0)
    assert all(t.numel() == 0 for t in skipped[2:]) and all(t.numel() > 0 for t in every[2:] if t is not None)
    leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
    with BackwardCalls() as calls:
        grouped_adapter(leaves[0], ids, leaves[1], w_down, b_down, w_up, b_up, act).backward(grad_y)
    assert calls.weight_grads == [False]
    torch.testing.assert_close(leaves[0].grad, every[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaves[1].grad, every[1].to(leaves[1].dtype), rtol=1e-6, atol=1e-6)
