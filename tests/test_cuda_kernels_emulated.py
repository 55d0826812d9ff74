"""The CUDA kernels of csrc/cuda/ run on the CPU through the device emulation (tests/cuda_emulation/), against
the loop oracle: both the generic kernels (every dtype) and the tensor-core kernels (bf16 / fp16), with the
routing, tiling, pipelining and synchronisation they use on a GPU. This is what checks the CUDA sources on
machines without a GPU; timing, occupancy and the hardware's own fragment layouts need the ``gpu`` tests of
test_grouped_adapter_kernels.py on a real device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emulated_cuda import emulated_grouped_adapter, launched_kernels, load_emulated_library
from grouped_inputs import GRAD_NAMES, errors_against_loop, make_inputs, relative_error, rounded, run
from test_grouped_adapter_kernels import KERNEL_CASES

from alter_ds.ops.grouped_adapter import ACTIVATIONS

ROUTING = ["count_experts_kernel", "scatter_assignments_kernel", "build_segments_kernel"]
GENERIC = ["row_gemm_kernel<Acc>", "weight_grad_kernel<Acc>", "activation_kernel", "hidden_grad_kernel"]
TENSOR_CORE = "tensor_core_kernel"


@pytest.fixture(autouse=True)
def emulated_library():
    load_emulated_library()  # once per process; a build failure is a test failure (CI has the compiler)
    launched_kernels()  # each test sees its own launches


def relative_errors(tensors, activation):
    return errors_against_loop(emulated_grouped_adapter, tensors, activation)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_generic_kernels_match_the_loop(case, dtype, tolerance):
    """fp32 sums over up to 5,000 rows (many_chunks' weight gradients) in another order than the oracle's: 1e-5
    of the largest value covers it; fp64 leaves only the last bits."""
    tensors, act = make_inputs(**KERNEL_CASES[case], activation="swiglu" if "k2" in case else "gelu", dtype=dtype)
    errors = relative_errors(tensors, act)
    assert max(errors.values()) < tolerance, errors
    launched = launched_kernels()
    assert TENSOR_CORE not in launched and set(GENERIC) <= set(launched) and set(ROUTING) <= set(launched)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_generic_kernels_every_activation(activation):
    tensors, act = make_inputs(n=37, d=10, r=3, experts=4, k=2, activation=activation)
    errors = relative_errors(tensors, act)
    assert max(errors.values()) < 1e-12, errors


# Tensor-core shapes: several 128-row tiles per expert, d not a multiple of the 64-column chunk, r and r' at and
# between the accumulator sizes (16 / 32 / 64 / 128), r' not a multiple of 8 (no vector w_down loads), k > 1
# (atomic outputs), experts without tokens, one expert with every token, no biases.
TENSOR_CORE_CASES = {
    "r16_multi_tile": dict(n=700, d=72, r=16, experts=3, k=1),
    "r17_k2_gelu_d200": dict(n=300, d=200, r=17, experts=4, k=2),
    "r64_swiglu": dict(n=260, d=64, r=64, experts=2, k=1),  # r' = 128: the largest accumulators
    "r5_reglu_d8": dict(n=150, d=8, r=5, experts=3, k=1),  # r' = 10: scalar w_down loads and partial fragments
    "r1_relu": dict(n=140, d=16, r=1, experts=2, k=1),
    "dense_k4": dict(n=90, d=24, r=8, experts=4, k=4, dense=True),
    "one_expert_has_all": dict(n=400, d=32, r=16, experts=5, k=1, ids=torch.full((400, 1), 3)),
    "no_bias_k2": dict(n=200, d=48, r=32, experts=3, k=2, bias=False),
    "model_width_d1024": dict(n=600, d=1024, r=16, experts=4, k=1),  # 16 chunks through the cp.async pipeline
}
ACTIVATION_OF = {"r64_swiglu": "swiglu", "r5_reglu_d8": "reglu", "r1_relu": "relu", "dense_k4": "geglu_tanh"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(TENSOR_CORE_CASES))
def test_tensor_core_kernels_match_the_loop(case, dtype):
    """bf16/fp16 operands, fp32 accumulation, fp32 router weights as models pass them. 1e-2 of the largest value
    covers the outputs' rounding to 8 (bf16) or 11 (fp16) bits; the fp32 intermediates are fed to the MMAs as two
    16-bit terms, so a wrong split or a lost term shows as errors well above that."""
    tensors, act = make_inputs(**TENSOR_CORE_CASES[case], activation=ACTIVATION_OF.get(case, "gelu"))
    errors = relative_errors(rounded(tensors, dtype, weights_dtype=torch.float32), act)
    assert max(errors.values()) < 1e-2, errors
    launched = launched_kernels()
    assert launched.count(TENSOR_CORE) == 2 and not set(GENERIC) & set(launched), launched


@pytest.mark.parametrize("case", ["r16_multi_tile", "r17_k2_gelu_d200", "r64_swiglu"])
def test_forced_generic_kernels_agree_with_the_tensor_core_kernels(case, monkeypatch):
    tensors, act = make_inputs(**TENSOR_CORE_CASES[case], activation=ACTIVATION_OF.get(case, "gelu"))
    low = rounded(tensors, torch.bfloat16, weights_dtype=torch.float32)
    y_tc, grads_tc = run(emulated_grouped_adapter, low, act)
    launched_kernels()
    monkeypatch.setenv("ALTER_DS_CUDA_GENERIC", "1")
    y_generic, grads_generic = run(emulated_grouped_adapter, low, act)
    assert TENSOR_CORE not in launched_kernels()
    for name, a, b in [("y", y_tc, y_generic), *zip(GRAD_NAMES, grads_tc, grads_generic)]:
        if a is not None:
            assert relative_error(a, b) < 1e-2, name


def test_misaligned_rows_take_the_generic_kernels():
    """The tensor-core kernels load rows 16 bytes at a time; x or grad_y starting 2 bytes into its storage must
    go to the generic kernels, with the same results."""
    tensors, act = make_inputs(n=150, d=32, r=16, experts=2, k=1, activation="gelu")
    args = rounded(tensors, torch.bfloat16, weights_dtype=torch.float32)
    grad_y = torch.randn(150, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def misaligned(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = storage[1:].view_as(t).copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    ops = torch.ops.alter_ds_emulated
    y, hidden = ops.grouped_adapter(*args, act)
    grads = ops.grouped_adapter_backward(grad_y, *args, hidden, act)
    assert launched_kernels().count(TENSOR_CORE) == 2
    y_shifted, hidden_shifted = ops.grouped_adapter(misaligned(args[0]), *args[1:], act)
    grads_shifted = ops.grouped_adapter_backward(misaligned(grad_y), *args, hidden, act)
    launched = launched_kernels()
    assert TENSOR_CORE not in launched and "row_gemm_kernel<Acc>" in launched
    for name, a, b in [
        ("y", y, y_shifted),
        ("hidden", hidden, hidden_shifted),
        *zip(["x", "weights", "w_down", "b_down", "w_up", "b_up"], grads, grads_shifted),
    ]:
        assert relative_error(b, a) < 1e-2, name


def test_routing_with_more_experts_than_one_scan_block():
    """build_segments scans the experts 1,024 at a time; most of these 1,100 experts have no token."""
    tensors, act = make_inputs(n=64, d=8, r=2, experts=1100, k=2, activation="relu", dtype=torch.float32)
    tensors[1] = torch.randint(1000, 1100, (64, 2), generator=torch.Generator().manual_seed(3))
    errors = relative_errors(tensors, act)
    assert max(errors.values()) < 1e-5, errors


def test_an_out_of_range_id_trips_the_device_assertion():
    """On a GPU this is a device-side assert; the emulation turns it into an error of the launch."""
    tensors, act = make_inputs(n=40, d=8, r=2, experts=2, k=1, dtype=torch.float32)
    tensors[1] = tensors[1].clone()
    tensors[1][7, 0] = 2
    with pytest.raises(RuntimeError, match="device-side assertion failed"):
        torch.ops.alter_ds_emulated.grouped_adapter(*tensors, act)


_SANITIZED_RUN = """
import sys
import torch
sys.path.insert(0, {tests!r})
from emulated_cuda import emulated_grouped_adapter, load_emulated_library
from grouped_inputs import errors_against_loop, make_inputs, rounded

load_emulated_library(address_sanitizer=True)
cases = [
    (torch.bfloat16, dict(n=300, d=200, r=17, experts=4, k=2), "gelu"),
    (torch.bfloat16, dict(n=260, d=64, r=64, experts=2, k=1), "swiglu"),
    (torch.float16, dict(n=150, d=8, r=5, experts=3, k=1, bias=False), "reglu"),
    (torch.float32, dict(n=50, d=11, r=3, experts=4, k=2), "swiglu"),
    (torch.float64, dict(n=10, d=5, r=2, experts=4, k=4, dense=True), "relu"),
]
for dtype, case, activation in cases:
    tensors, _ = make_inputs(**case, activation=activation)
    errors = errors_against_loop(emulated_grouped_adapter, rounded(tensors, dtype), activation)
    assert max(errors.values()) < 1e-2, (case, errors)
print("sanitized run ok")
"""


def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """compute-sanitizer's memcheck, on the CPU: the emulated kernels built with -fsanitize=address, in a process
    with libasan preloaded, on tensor-core and generic shapes. Any read or write past a tensor stops the process
    with a report naming the kernel's source line."""
    from emulated_cuda import REPO

    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not Path(libasan).is_file():
        pytest.skip("g++ has no AddressSanitizer runtime (libasan) here")
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(REPO))
    code = _SANITIZED_RUN.format(tests=str(REPO / "tests"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert "ERROR: AddressSanitizer" not in done.stderr, done.stderr[-6000:]
    assert done.returncode == 0 and "sanitized run ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("case", ["r16_multi_tile", "r17_k2_gelu_d200", "no_bias_k2"])
@pytest.mark.parametrize("generic", [False, True], ids=["tensor-core", "generic"])
def test_a_router_only_backward_skips_the_expert_weight_gradients(case, generic, monkeypatch):
    """weight_grads=False (frozen experts): both kernel families leave the expert-weight gradients out (empty
    tensors) and give the same grad_x and mixture gradient as the full backward."""
    if generic:
        monkeypatch.setenv("ALTER_DS_CUDA_GENERIC", "1")
    tensors, act = make_inputs(**TENSOR_CORE_CASES[case], activation=ACTIVATION_OF.get(case, "gelu"))
    args = rounded(tensors, torch.bfloat16, weights_dtype=torch.float32)
    grad_y = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ops = torch.ops.alter_ds_emulated
    _, hidden = ops.grouped_adapter(*args, act)
    every = ops.grouped_adapter_backward(grad_y, *args, hidden, act)
    launched_kernels()
    skipped = ops.grouped_adapter_backward(grad_y, *args, hidden, act, False)
    assert (TENSOR_CORE in launched_kernels()) is not generic
    for index in (0, 1):
        torch.testing.assert_close(skipped[index], every[index], rtol=0, atol=0)
    assert all(t.numel() == 0 for t in skipped[2:])
