"""The vectorised grouped adapter op (the PyTorch reference) against the loop oracle: forward, every gradient,
fp64 gradcheck; argument checks and implementation choice. The compiled kernels: test_grouped_adapter_kernels."""

from __future__ import annotations

import pytest
import torch
from grouped_inputs import ATOL, CASES, RTOL, make_inputs, run

from alter_ds.ops import build, grouped_adapter, grouped_adapter_loop, grouped_adapter_reference
from alter_ds.ops.grouped_adapter import IMPLEMENTATION_ENV


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "identity", "swiglu", "geglu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_loop_forward_and_gradients(case, activation):
    tensors, act = make_inputs(**CASES[case], activation=activation, dtype=torch.float32)
    y_ref, g_ref = run(grouped_adapter_reference, tensors, act)
    y_loop, g_loop = run(grouped_adapter_loop, tensors, act)
    torch.testing.assert_close(y_ref, y_loop, rtol=RTOL, atol=ATOL)
    for name, a, b in zip(["x", "ids", "weights", "w_down", "b_down", "w_up", "b_up"], g_ref, g_loop):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")


def test_experts_without_tokens_get_zero_gradients_not_none():
    ids = torch.tensor([[0], [0], [3], [3], [3]])  # experts 1, 2 and 4 get no token
    tensors, act = make_inputs(n=5, d=4, r=2, experts=5, k=1, ids=ids, dtype=torch.float32)
    _, grads = run(grouped_adapter_reference, tensors, act)
    w_down_grad = grads[3]
    assert w_down_grad is not None and w_down_grad.shape == (5, 4, 2)
    assert torch.count_nonzero(w_down_grad[[1, 2, 4]]) == 0
    assert torch.count_nonzero(w_down_grad[[0, 3]]) > 0


def test_all_tokens_on_one_expert_and_unsorted_ids():
    ids = torch.full((9, 1), 2)
    tensors, act = make_inputs(n=9, d=5, r=3, experts=4, k=1, ids=ids, dtype=torch.float32)
    torch.testing.assert_close(
        run(grouped_adapter_reference, tensors, act)[0], run(grouped_adapter_loop, tensors, act)[0]
    )
    ids = torch.tensor([[3, 0], [1, 2], [0, 3], [2, 2], [1, 0]])
    tensors, act = make_inputs(n=5, d=5, r=3, experts=4, k=2, ids=ids, dtype=torch.float32)
    torch.testing.assert_close(
        run(grouped_adapter_reference, tensors, act)[0], run(grouped_adapter_loop, tensors, act)[0]
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gradcheck_float64(activation):
    tensors, act = make_inputs(n=6, d=4, r=2, experts=3, k=2, activation=activation)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: grouped_adapter_reference(*a, act), tuple(leaves), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("d_out", [3, 11])
def test_experts_that_change_the_width_match_the_loop_and_gradcheck(d_out):
    """LoRA experts: identity activation, no biases, ``d`` in and ``d_out`` out (narrower and wider)."""
    tensors, act = make_inputs(n=7, d=5, r=2, experts=3, k=2, activation="identity", bias=False, d_out=d_out)
    y, grads = run(grouped_adapter, tensors, act)
    y_loop, grads_loop = run(grouped_adapter_loop, tensors, act)
    assert y.shape == (7, d_out)
    torch.testing.assert_close(y, y_loop)
    for name, a, b in zip(["x", "ids", "weights", "w_down", "b_down", "w_up", "b_up"], grads, grads_loop):
        if a is not None:
            torch.testing.assert_close(a, b, msg=f"gradient of {name}")
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    assert torch.autograd.gradcheck(lambda *a: grouped_adapter_reference(*a, act), tuple(leaves), eps=1e-6, atol=1e-5)


def test_bfloat16_close_to_float64():
    tensors, act = make_inputs(n=32, d=16, r=4, experts=4, k=1, dtype=torch.float64)
    expected = grouped_adapter_loop(*tensors, act)
    low = [t.to(torch.bfloat16) if t is not None and t.is_floating_point() else t for t in tensors]
    got = grouped_adapter(*low, act).double()
    # bf16 has an 8-bit mantissa: relative error ~1e-2 after two matmuls of this width.
    torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.__setitem__(1, torch.tensor([[0], [7]])), "expert_ids must lie in"),
        (lambda t: t.__setitem__(1, torch.tensor([[0], [-1]])), "expert_ids must lie in"),
        (lambda t: t.__setitem__(1, torch.tensor([0, 1])), "expert_ids must be"),
        (lambda t: t.__setitem__(2, torch.ones(2, 2)), "expert_weights must have the shape"),
        (lambda t: t.__setitem__(5, torch.zeros(3, 3, 4)), "w_up must be"),
        (lambda t: t.__setitem__(6, torch.zeros(3, 5)), "b_up must be"),
        (lambda t: t.__setitem__(0, torch.zeros(2, 3, 4)), "x must be"),
        (lambda t: t.__setitem__(4, torch.zeros(2, 2)), "b_down must be"),
    ],
)
def test_bad_arguments_give_clear_errors(mutate, message):
    tensors, act = make_inputs(n=2, d=4, r=2, experts=3, k=1, ids=torch.tensor([[0], [1]]), dtype=torch.float32)
    tensors = list(tensors)
    mutate(tensors)
    with pytest.raises(ValueError, match=message):
        grouped_adapter(*tensors, act)


def test_unknown_activation_and_forced_missing_implementation(monkeypatch):
    tensors, _ = make_inputs(n=2, d=4, r=2, experts=3, k=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        grouped_adapter(*tensors, "tanhh")
    monkeypatch.setenv(IMPLEMENTATION_ENV, "bogus")
    with pytest.raises(ValueError, match=IMPLEMENTATION_ENV):
        grouped_adapter(*tensors, "relu")
    monkeypatch.setenv(IMPLEMENTATION_ENV, "reference")
    torch.testing.assert_close(grouped_adapter(*tensors, "relu"), grouped_adapter_loop(*tensors, "relu"))


def test_forcing_a_kernel_that_did_not_build_is_a_clear_error(monkeypatch):
    tensors, _ = make_inputs(n=2, d=4, r=2, experts=3, k=1, dtype=torch.float32)
    monkeypatch.setattr(build, "_loaded", {"cpu": False, "cuda": False})  # as after failed builds
    monkeypatch.setenv(IMPLEMENTATION_ENV, "cpp")
    with pytest.raises(RuntimeError, match="not available for cpu"):
        grouped_adapter(*tensors, "relu")
    monkeypatch.setenv(IMPLEMENTATION_ENV, "auto")  # auto falls back to the reference
    torch.testing.assert_close(grouped_adapter(*tensors, "relu"), grouped_adapter_loop(*tensors, "relu"))


def test_bfloat16_bias_gradients_are_as_good_as_the_loops():
    """Bias gradients sum over every token of an expert. Through a bf16 gather's index_add they were off by
    50-350% of the largest value here; through the routing matmuls they carry only the bf16 rounding of the
    intermediates, as the plain loop does (2.5% and 1.1% here; the fp32-accumulating kernels stay under 1%)."""
    tensors, act = make_inputs(n=3000, d=40, r=8, experts=4, k=2, dtype=torch.float64)
    low = [t.to(torch.bfloat16) if t is not None and t.is_floating_point() else t for t in tensors]
    _, grads = run(grouped_adapter_reference, low, act)
    _, exact = run(
        grouped_adapter_loop, [t.double() if t is not None and t.is_floating_point() else t for t in low], act
    )
    for index in (4, 6):  # b_down, b_up
        error = (grads[index].double() - exact[index]).abs().max() / exact[index].abs().max()
        assert error < 5e-2, f"bias {index}: max error {error:.2e} of the largest value"


@pytest.mark.parametrize("ids", [torch.full((40, 1), 2), torch.tensor([[0]] * 30 + [[1]] * 2 + [[3]] * 8)])
def test_skewed_routing_takes_the_unpadded_path_with_the_same_gradients(ids):
    """One hot expert makes padding wasteful: the reference multiplies group by group, same results."""
    tensors, act = make_inputs(n=ids.shape[0], d=6, r=3, experts=4, k=1, ids=ids, dtype=torch.float32)
    y_ref, g_ref = run(grouped_adapter_reference, tensors, act)
    y_loop, g_loop = run(grouped_adapter_loop, tensors, act)
    torch.testing.assert_close(y_ref, y_loop, rtol=RTOL, atol=ATOL)
    for a, b in zip(g_ref, g_loop):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("by_expert", [False, True], ids=["gathered", "by-expert"])
@pytest.mark.parametrize(
    "activation, bias, d_out", [("relu", True, None), ("swiglu", False, None), ("identity", False, 3)]
)
def test_per_example_routes_through_batched_matmuls_equal_the_op(activation, bias, d_out, by_expert):
    """Routes chosen per example (``expert_ids [B, k]``, as every task-level router gives) take
    ``per_example_experts`` in the model: each example's experts gathered (two bmm's per slot), or each expert
    over the rows that chose it. Against the loop oracle on the routes broadcast to tokens: output and every
    gradient, float64, and a gradcheck."""
    from alter_ds.mta.block import per_example_experts

    batch, length, d = 5, 4, 6
    tensors, act = make_inputs(n=batch, d=d, r=3, experts=4, k=2, activation=activation, bias=bias, d_out=d_out)
    x = torch.randn(batch, length, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids, weights = tensors[1], tensors[2]
    expert_args = tensors[3:]

    def per_example(x, weights, *expert):
        return per_example_experts(x, ids, weights, *expert, act, by_expert=by_expert)

    def oracle(x, weights, *expert):
        tokens = x.reshape(-1, d)
        flat_ids = ids[:, None, :].expand(batch, length, -1).reshape(-1, 2)
        flat_weights = weights[:, None, :].expand(batch, length, -1).reshape(-1, 2)
        return grouped_adapter_loop(tokens, flat_ids, flat_weights, *expert, act).reshape(batch, length, -1)

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weights, *expert_args)]
    got = per_example(*leaves)
    got.square().sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    for t in leaves:
        if t is not None:
            t.grad = None
    want = oracle(*leaves)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    for name, a, t in zip(["x", "weights", "w_down", "b_down", "w_up", "b_up"], grads, leaves):
        if t is not None:
            torch.testing.assert_close(a, t.grad, msg=f"gradient of {name}")
    unused = sorted(set(range(4)) - set(ids.flatten().tolist()))
    if unused:  # experts no example chose: a dense zero gradient, not None
        assert not bool(grads[2][unused].any())
    present = [t for t in leaves if t is not None]
    assert torch.autograd.gradcheck(lambda *a: per_example(*a[:2], *_fill(a[2:], expert_args)), tuple(present))


def _fill(given, template):
    """The expert tensors in the op's order, with None where the template has no bias."""
    values = iter(given)
    return [next(values) if t is not None else None for t in template]


def test_per_example_routes_pick_the_path_that_moves_less_memory():
    """Small experts (an r = 16 adapter) are gathered per example; FFN copies over many rows (label scoring's
    repeated prompts) run by expert, since gathering them copies a whole FFN per (row, slot)."""
    from alter_ds.mta.block import _moves_less_by_expert

    d, tokens = 576, 96
    x = torch.zeros(256, tokens, d)
    many_rows = torch.zeros(256, 1, dtype=torch.long)
    adapter = (torch.zeros(9, d, 16), torch.zeros(9, 16, d))
    ffn = (torch.zeros(9, d, 2 * 1536), torch.zeros(9, 1536, d))
    assert not _moves_less_by_expert(x, many_rows, *adapter)
    assert _moves_less_by_expert(x, many_rows, *ffn)
    assert not _moves_less_by_expert(x[:2], many_rows[:2], *ffn)  # 2 rows, 9 experts: gathering 2 is less
