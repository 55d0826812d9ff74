"""The grouped adapter op: every token through its own experts, one call per layer.

    y_n = sum_j w_nj * expert_{e_nj}(x_n),   expert_e(x) = act(x @ w_down[e] + b_down[e]) @ w_up[e] + b_up[e]

Gated activations (``swiglu``, ``geglu``, ``geglu_tanh``) hold the gate in the first half of the
down projection and the up projection in the second half (``w_down`` is ``[E, d, 2r]``), which is how a
Llama-family or T5 v1.1 feed-forward becomes one expert.

An expert may change the width (``w_up`` is ``[E, r, d_out]``, ``y`` is ``[N, d_out]``): LoRA experts on a
projection whose output is narrower or wider than its input (grouped-query ``k``/``v``, ``up``, ``down``). The
reference and the C++ kernel take them; the CUDA kernels keep ``d_out = d``, so on a GPU they run on the reference.

Three implementations share this signature: the vectorised PyTorch ``reference`` (the fallback, below),
and the C++ / CUDA kernels from ``csrc/`` registered as ``alter_ds::grouped_adapter``. ``grouped_adapter_loop``
is a deliberately naive per-expert loop kept as the test oracle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

IMPLEMENTATION_ENV = "ALTER_DS_GROUPED_ADAPTER"
IMPLEMENTATIONS = ("auto", "reference", "cpp", "cuda")

_BASE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "identity": lambda t: t,
}
_GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}
ACTIVATIONS = tuple(_BASE_ACTIVATIONS) + tuple(_GATED_ACTIVATIONS)


def is_gated(activation: str) -> bool:
    """Whether ``activation`` multiplies a gate half with an up half (so ``w_down`` is twice as wide)."""
    check_activation(activation)
    return activation in _GATED_ACTIVATIONS


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def apply_activation(hidden: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply ``activation`` to the down projection's output (``[..., r']`` -> ``[..., r]``)."""
    if activation in _GATED_ACTIVATIONS:
        gate, up = hidden.chunk(2, dim=-1)
        return _BASE_ACTIVATIONS[_GATED_ACTIVATIONS[activation]](gate) * up
    return _BASE_ACTIVATIONS[activation](hidden)


def check_grouped_adapter_args(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> None:
    """Reject wrong shapes and ids out of range with a message naming the argument, never a crash."""
    check_activation(activation)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d], got shape {tuple(x.shape)}")
    n_tokens, width = x.shape
    if expert_ids.dim() != 2 or expert_ids.shape[0] != n_tokens:
        raise ValueError(f"expert_ids must be [N={n_tokens}, k], got shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype != torch.int64:
        raise ValueError(f"expert_ids must be int64, got {expert_ids.dtype}")
    if expert_weights.shape != expert_ids.shape:
        raise ValueError(
            f"expert_weights must have the shape of expert_ids {tuple(expert_ids.shape)}, "
            f"got {tuple(expert_weights.shape)}"
        )
    if w_down.dim() != 3 or w_down.shape[1] != width:
        raise ValueError(f"w_down must be [E, d={width}, r'], got shape {tuple(w_down.shape)}")
    num_experts, _, down_width = w_down.shape
    rank = down_width // 2 if activation in _GATED_ACTIVATIONS else down_width
    if activation in _GATED_ACTIVATIONS and down_width % 2:
        raise ValueError(f"gated activation {activation!r} needs an even w_down width, got {down_width}")
    if w_up.dim() != 3 or tuple(w_up.shape[:2]) != (num_experts, rank):
        raise ValueError(f"w_up must be [E={num_experts}, r={rank}, d_out], got shape {tuple(w_up.shape)}")
    out_width = w_up.shape[2]
    if b_down is not None and tuple(b_down.shape) != (num_experts, down_width):
        raise ValueError(f"b_down must be [E={num_experts}, {down_width}], got shape {tuple(b_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (num_experts, out_width):
        raise ValueError(f"b_up must be [E={num_experts}, d_out={out_width}], got shape {tuple(b_up.shape)}")
    if expert_ids.numel() and not expert_ids.is_cuda:
        low, high = int(expert_ids.min()), int(expert_ids.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, {num_experts}), got values in [{low}, {high}]")
    elif expert_ids.numel():
        torch._assert_async(((expert_ids >= 0) & (expert_ids < num_experts)).all())


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The N*k token-expert pairs sorted stably by expert: each pair's position in ``expert_ids.reshape(-1)``,
    its token, its expert, and the number of pairs per expert."""
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_index = torch.div(order, expert_ids.shape[1], rounding_mode="floor")
    group = flat_ids[order]
    return order, token_index, group, torch.bincount(group, minlength=num_experts)


def _segment_matmul(
    rows: torch.Tensor, group: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """rows[i] @ weight[group[i]] for rows sorted by group.

    Balanced routing: rows are scattered into a [E, C, in] buffer (C = the largest group) for one ``bmm``.
    When padding would more than double the work (skewed routing, one hot expert), one matmul per non-empty
    group instead: a few kernel launches cost less than multiplying E x C rows. Either way the stacked weight
    gets a dense gradient (zeros for experts without rows). The C++/CUDA kernels need neither.
    """
    num_experts = weight.shape[0]
    sizes = counts.tolist()
    capacity = max(sizes, default=0)
    if num_experts * capacity > 2 * rows.shape[0] and rows.shape[0] > 0:
        parts = [chunk @ weight[e] for e, chunk in enumerate(rows.split(sizes)) if chunk.shape[0]]
        return torch.cat(parts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(rows.shape[0], device=rows.device) - starts[group]
    padded = rows.new_zeros(num_experts, capacity, rows.shape[1])
    padded = padded.index_put((group, position), rows)
    return torch.bmm(padded, weight)[group, position]


def grouped_adapter_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Vectorised PyTorch implementation: sort token-expert pairs by expert, two batched matmuls.

    No Python loop over experts; autograd gives dense gradients for the stacked weights (zeros for experts
    without tokens), which ZeRO-2's position-based gradient buckets need.
    """
    n_tokens = expert_ids.shape[0]
    num_experts = w_down.shape[0]
    order, token_index, group, counts = sort_by_expert(expert_ids, num_experts)
    rows = x[token_index]
    hidden = _segment_matmul(rows, group, counts, w_down)
    if b_down is not None:
        # Biases enter through matmuls with the routing, not gathers: the gradient of b[group] would be an
        # index_add summed in the parameters' dtype (bf16 loses several percent over a few thousand tokens),
        # while a matmul's gradient accumulates in fp32.
        hidden = hidden + F.one_hot(group, num_experts).to(hidden.dtype) @ b_down
    hidden = apply_activation(hidden, activation)
    out = _segment_matmul(hidden, group, counts, w_up)
    weights = expert_weights.reshape(-1)[order].to(out.dtype)
    y = x.new_zeros(n_tokens, w_up.shape[2]).index_add(0, token_index, out * weights.unsqueeze(-1))
    if b_up is not None:
        mixture = x.new_zeros(n_tokens, num_experts).index_put((token_index, group), weights, accumulate=True)
        y = y + mixture @ b_up
    return y


def grouped_adapter_loop(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The test oracle: a plain loop over experts and mixture slots, written for obviousness."""
    y = x.new_zeros(x.shape[0], w_up.shape[2])
    for expert in range(w_down.shape[0]):
        for slot in range(expert_ids.shape[1]):
            mask = expert_ids[:, slot] == expert
            if not bool(mask.any()):
                continue
            hidden = x[mask] @ w_down[expert]
            if b_down is not None:
                hidden = hidden + b_down[expert]
            out = apply_activation(hidden, activation) @ w_up[expert]
            if b_up is not None:
                out = out + b_up[expert]
            y = y.index_put((mask.nonzero().squeeze(1),), out * expert_weights[mask, slot, None], accumulate=True)
    return y


def selected_implementation() -> str:
    """The implementation asked for by ``ALTER_DS_GROUPED_ADAPTER`` (default ``auto``)."""
    choice = os.environ.get(IMPLEMENTATION_ENV, "auto").strip().lower() or "auto"
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPLEMENTATION_ENV}={choice!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return choice


def _native_kernel(device: torch.device, forced: bool) -> Callable[..., torch.Tensor] | None:
    """The compiled C++/CUDA op for this device, building it on first use; None when it is unavailable.

    CUDA tensors get the CUDA kernels when forced, or under ``auto`` once they are verified on a GPU
    (``build.CUDA_KERNELS_VERIFIED``)."""
    from alter_ds.ops import build, kernels

    if device.type == "cpu":
        available = build.load_extension()
    elif device.type == "cuda" and (forced or build.CUDA_KERNELS_VERIFIED):
        available = build.load_cuda_extension()
    else:
        return None
    if not available or not kernels.has_kernel(device.type):
        return None

    def run(*args: object) -> torch.Tensor:
        contiguous = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        return torch.ops.alter_ds.grouped_adapter(*contiguous)[0]

    return run


def grouped_adapter(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Apply each token's experts with its mixture weights: ``x[N,d] -> y[N,d_out]`` (see the module docstring).

    Dispatches to the fastest loaded implementation; ``ALTER_DS_GROUPED_ADAPTER=reference|cpp|cuda`` forces one.
    On a GPU, experts that change the width run on the reference (the CUDA kernels keep ``d_out = d``).
    """
    check_grouped_adapter_args(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation)
    choice = selected_implementation()
    forced_device = {"cpp": "cpu", "cuda": "cuda"}.get(choice)
    if forced_device is not None and x.device.type != forced_device:
        raise ValueError(f"{IMPLEMENTATION_ENV}={choice} runs on {forced_device} tensors, got {x.device}")
    if w_up.shape[2] != x.shape[1] and x.device.type == "cuda":  # the CUDA kernels keep the width
        if forced_device is not None:
            raise ValueError(
                f"{IMPLEMENTATION_ENV}={choice}: the CUDA kernels take experts with d_out = d "
                f"(got {x.shape[1]} -> {w_up.shape[2]}); unset it to run these on the PyTorch reference"
            )
        return grouped_adapter_reference(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation)
    if choice in ("auto", "cpp", "cuda"):
        kernel = _native_kernel(x.device, forced=forced_device is not None)
        if kernel is not None:
            return kernel(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation)
        if choice != "auto":
            raise RuntimeError(
                f"{IMPLEMENTATION_ENV}={choice} but the compiled op is not available for {x.device.type} "
                f"(see the build warning above); unset it to fall back to the PyTorch reference"
            )
    return grouped_adapter_reference(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation)


def init_down_projection(weight: torch.Tensor) -> None:
    """Kaiming-uniform init of a stacked ``[E, in, out]`` projection, each expert like ``nn.Linear``."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
