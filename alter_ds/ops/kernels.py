"""Autograd and fake (meta) implementations of the compiled ``alter_ds::grouped_adapter`` op.

The C++/CUDA library defines two ops: ``grouped_adapter`` returns ``(y, hidden)``, where ``hidden`` is the
pre-activation of every (token, slot) in the accumulation type, and ``grouped_adapter_backward`` turns
``grad_y`` and ``hidden`` into every gradient. Registering the autograd formula and the fake tensors here, with
``torch.library``, is what lets the op run under autograd, DeepSpeed's hooks and ``torch.compile`` alike.
"""

from __future__ import annotations

from typing import Any

import torch

NAMESPACE = "alter_ds"
_registered: set[str] = set()  # op namespaces whose Python parts are attached


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x.new_empty((x.shape[0], expert_ids.shape[1], w_down.shape[2]), dtype=_accumulation_dtype(x.dtype))
    return x.new_empty((x.shape[0], w_up.shape[2])), hidden


def _fake_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    hidden: torch.Tensor,
    activation: str,
    weight_grads: bool = True,
) -> tuple[torch.Tensor, ...]:
    def shape(tensor: torch.Tensor | None) -> tuple[int, ...]:
        return tuple(tensor.shape) if tensor is not None and weight_grads else (0,)

    return (
        x.new_empty(x.shape),
        expert_weights.new_empty(expert_weights.shape),
        w_down.new_empty(shape(w_down)),
        w_down.new_empty(shape(b_down)),
        w_up.new_empty(shape(w_up)),
        w_up.new_empty(shape(b_up)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation = inputs
    ctx.activation = activation
    ctx.has_bias = (b_down is not None, b_up is not None)
    ctx.save_for_backward(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad_y: torch.Tensor, grad_hidden: torch.Tensor | None) -> tuple[Any, ...]:
    x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, hidden = ctx.saved_tensors
    backward_op = getattr(torch.ops, ctx.namespace).grouped_adapter_backward
    # inputs: x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation. A router-only stage needs
    # no expert-weight gradient, and the kernels then skip computing them (half of the backward's matmuls).
    weight_grads = any(ctx.needs_input_grad[i] for i in (3, 4, 5, 6))
    grads = backward_op(
        grad_y.contiguous(), x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, hidden, ctx.activation,
        weight_grads,
    )  # fmt: skip
    grad_x, grad_weights, grad_w_down, grad_b_down, grad_w_up, grad_b_up = grads
    return (
        grad_x,
        None,
        grad_weights,
        grad_w_down if weight_grads else None,
        grad_b_down if weight_grads and ctx.has_bias[0] else None,
        grad_w_up if weight_grads else None,
        grad_b_up if weight_grads and ctx.has_bias[1] else None,
        None,
    )


def register_python_parts(namespace: str = NAMESPACE) -> None:
    """Attach the fake implementations and the autograd formula to a loaded library's two ops (once).

    ``namespace`` is ``alter_ds`` for the extension; the test suite's CPU emulation of the CUDA kernels registers
    the same ops under its own namespace and reuses these parts."""
    if namespace in _registered:
        return

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        _setup_context(ctx, inputs, output)
        ctx.namespace = namespace

    torch.library.register_fake(f"{namespace}::grouped_adapter")(_fake_forward)
    torch.library.register_fake(f"{namespace}::grouped_adapter_backward")(_fake_backward)
    torch.library.register_autograd(f"{namespace}::grouped_adapter", _backward, setup_context=setup_context)
    _registered.add(namespace)


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has a kernel for this device (a CPU-only build has none for CUDA)."""
    if NAMESPACE not in _registered:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::grouped_adapter", key)
