"""Inputs for the grouped adapter op's tests: random tensors of a given shape and routing, and one
forward + backward returning the output and every gradient."""

from __future__ import annotations

import torch

from alter_ds.ops import grouped_adapter_loop, is_gated

GRAD_NAMES = ["x", "ids", "weights", "w_down", "b_down", "w_up", "b_up"]

# fp32 comparisons: the two paths sum in different orders; 1e-5 relative covers it at these sizes.
RTOL, ATOL = 1e-5, 1e-5


def make_inputs(
    n, d, r, experts, k, activation="relu", bias=True, dtype=torch.float64, seed=0, ids=None, dense=False, d_out=None
):
    """``d_out``: experts that change the width (LoRA on a projection), ``d`` in, ``d_out`` out."""
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d
    down = 2 * r if is_gated(activation) else r
    x = torch.randn(n, d, generator=g, dtype=dtype)
    if dense:
        expert_ids = torch.arange(experts).expand(n, experts).clone()
    elif ids is not None:
        expert_ids = ids
    else:
        expert_ids = torch.randint(0, experts, (n, k), generator=g)
    weights = torch.rand(expert_ids.shape, generator=g, dtype=dtype)
    tensors = [
        x,
        expert_ids,
        weights,
        torch.randn(experts, d, down, generator=g, dtype=dtype) / d**0.5,
        torch.randn(experts, down, generator=g, dtype=dtype) if bias else None,
        torch.randn(experts, r, d_out, generator=g, dtype=dtype) / r**0.5,
        torch.randn(experts, d_out, generator=g, dtype=dtype) if bias else None,
    ]
    return tensors, activation


def run(fn, tensors, activation):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
    y = fn(*leaves, activation)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y))  # fp16 cannot count to N·d
    grads = [t.grad if t is not None and t.is_floating_point() else None for t in leaves]
    return y.detach(), grads


def rounded(tensors, dtype, weights_dtype=None):
    """The floating inputs in ``dtype`` (the mixture weights in ``weights_dtype`` when given, as routers pass fp32)."""
    low = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    if weights_dtype is not None:
        low[2] = low[2].to(weights_dtype)
    return low


def relative_error(got, want):
    """max |got - want| / max |want|, in float64 on the CPU."""
    want = want.cpu().double()
    return ((got.cpu().double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def errors_against_loop(fn, tensors, activation):
    """``fn``'s y and every gradient against the loop oracle run in fp64 on the same (possibly rounded) values:
    name -> relative_error. Each output must come back in its input's dtype."""
    y, grads = run(fn, tensors, activation)
    exact = [t.cpu().double() if t is not None and t.is_floating_point() else t for t in tensors]
    y_ref, grads_ref = run(grouped_adapter_loop, exact, activation)
    errors = {}
    for name, tensor, got, want in [("y", tensors[0], y, y_ref), *zip(GRAD_NAMES, tensors, grads, grads_ref)]:
        if want is None:
            assert got is None, name
            continue
        assert got is not None and got.shape == want.shape and got.dtype == tensor.dtype, name
        errors[name] = relative_error(got, want)
    return errors


CASES = {
    "d_not_multiple_of_8": dict(n=13, d=11, r=3, experts=4, k=1),
    "rank_one": dict(n=9, d=8, r=1, experts=3, k=1),
    "k2": dict(n=17, d=6, r=4, experts=5, k=2),
    "dense": dict(n=10, d=5, r=2, experts=4, k=4, dense=True),
    "one_token": dict(n=1, d=7, r=2, experts=3, k=1),
    "no_bias": dict(n=12, d=6, r=3, experts=3, k=1, bias=False),
}
