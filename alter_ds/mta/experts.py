"""Expert banks: E experts of one layer held as stacked parameters.

One parameter per weight kind (``w_down [E, d, r']``, ``b_down [E, r']``, ``w_up [E, r, d]``, ``b_up [E, d]``)
lets one grouped call serve every expert and gives every expert a gradient tensor each step (zeros when it
saw no tokens). ZeRO-1/2 reduce gradients by bucket position in hook order, so experts held as separate
parameters that fire in a different order on different ranks get silently wrong gradients.

Kinds:
- ``bottleneck``: d -> r -> d with the up projection zero-initialised, added as a residual branch, so a fresh
  model computes exactly what the backbone computes.
- ``ffn``: every expert a copy of the layer's pretrained feed-forward sub-layer (gated FFNs included),
  replacing it, as the official ALTER code does; copies mixed with weights summing to 1 reproduce the backbone.
- ``lora``: low-rank updates of one linear projection (``w_down`` holds each expert's A as ``[d_in, r]``,
  ``w_up`` its B as ``[r, d_out]``, identity activation, no biases), B zero-initialised; the block adds
  ``(alpha / r) * Σ_j w_j B_j A_j x`` to the projection's own output (``lora.py``).
(``layer`` experts, whole-layer copies, live in ``layer_experts.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alter_ds.ops.grouped_adapter import init_down_projection, is_gated


@dataclass
class FeedForwardWeights:
    """A pretrained feed-forward sub-layer in the op's layout: ``act(x @ w_in + b_in) @ w_out + b_out``."""

    w_in: torch.Tensor  # [d, r'] (gate half first for gated activations)
    b_in: torch.Tensor | None  # [r']
    w_out: torch.Tensor  # [r, d]
    b_out: torch.Tensor | None  # [d]
    activation: str


class ExpertBank(nn.Module):
    """A bank of experts with stacked weights; the expert index is always the leading dimension."""

    b_down: nn.Parameter | None
    b_up: nn.Parameter | None
    pretrained_w_in: torch.Tensor
    pretrained_w_out: torch.Tensor
    pretrained_b_in: torch.Tensor | None
    pretrained_b_out: torch.Tensor | None

    def __init__(
        self,
        num_experts: int,
        width: int,
        rank: int,
        activation: str,
        bias_down: bool = True,
        bias_up: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        out_width: int | None = None,
    ):
        super().__init__()
        self.width = width
        #: what the experts write: the width they read, except LoRA experts on a projection that changes it
        self.out_width = out_width if out_width is not None else width
        self.rank = rank
        self.activation = activation
        down_width = 2 * rank if is_gated(activation) else rank
        self.w_down = nn.Parameter(torch.zeros(num_experts, width, down_width, dtype=dtype, device=device))
        self.b_down = (
            nn.Parameter(torch.zeros(num_experts, down_width, dtype=dtype, device=device)) if bias_down else None
        )
        self.w_up = nn.Parameter(torch.zeros(num_experts, rank, self.out_width, dtype=dtype, device=device))
        self.b_up = (
            nn.Parameter(torch.zeros(num_experts, self.out_width, dtype=dtype, device=device)) if bias_up else None
        )

    @property
    def num_experts(self) -> int:
        return self.w_down.shape[0]

    def weights(self) -> list[torch.Tensor | None]:
        return [self.w_down, self.b_down, self.w_up, self.b_up]

    def init_bottleneck(self, experts: slice | None = None) -> None:
        """Linear-style down projection, zero up projection: the residual branch starts at exactly 0."""
        index = experts if experts is not None else slice(None)
        with torch.no_grad():
            init_down_projection(self.w_down[index])
            for tensor in (self.b_down, self.w_up, self.b_up):
                if tensor is not None:
                    tensor[index].zero_()

    def init_from_feed_forward(self, source: FeedForwardWeights, experts: slice | None = None) -> None:
        """Copy a pretrained feed-forward sub-layer into the given experts (all by default)."""
        index = experts if experts is not None else slice(None)
        with torch.no_grad():
            self.w_down[index].copy_(source.w_in)
            self.w_up[index].copy_(source.w_out)
            for tensor, value in ((self.b_down, source.b_in), (self.b_up, source.b_out)):
                if tensor is not None:
                    tensor[index].copy_(value if value is not None else torch.zeros_like(tensor[0]))

    def remember_pretrained(self, source: FeedForwardWeights) -> None:
        """Keep the pretrained FFN (not saved) so experts added later can start from it."""
        self.register_buffer("pretrained_w_in", source.w_in.detach().clone(), persistent=False)
        self.register_buffer("pretrained_w_out", source.w_out.detach().clone(), persistent=False)
        for name, value in (("pretrained_b_in", source.b_in), ("pretrained_b_out", source.b_out)):
            self.register_buffer(name, value.detach().clone() if value is not None else None, persistent=False)

    def pretrained(self) -> FeedForwardWeights | None:
        if getattr(self, "pretrained_w_in", None) is None:
            return None
        return FeedForwardWeights(
            self.pretrained_w_in, self.pretrained_b_in, self.pretrained_w_out, self.pretrained_b_out, self.activation
        )

    def init_from_expert(self, source: int, experts: slice) -> None:
        with torch.no_grad():
            for tensor in self.weights():
                if tensor is not None:
                    tensor[experts].copy_(tensor[source])

    def random_perturb(self, std: float, generator: torch.Generator | None = None) -> None:
        """Add small Gaussian noise to every weight (tests, and breaking symmetry between FFN copies)."""
        with torch.no_grad():
            for tensor in self.weights():
                if tensor is not None:
                    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
                    tensor.add_(noise.to(device=tensor.device, dtype=tensor.dtype))

    def resized(self, num_experts: int) -> ExpertBank:
        """A new bank with ``num_experts`` experts holding this bank's first experts (rest zero)."""
        bank = ExpertBank(
            num_experts,
            self.width,
            self.rank,
            self.activation,
            bias_down=self.b_down is not None,
            bias_up=self.b_up is not None,
            dtype=self.w_down.dtype,
            device=self.w_down.device,
            out_width=self.out_width,
        )
        source = self.pretrained()
        if source is not None:
            bank.remember_pretrained(source)
        keep = min(num_experts, self.num_experts)
        with torch.no_grad():
            for new, old in zip(bank.weights(), self.weights()):
                if new is not None and old is not None:
                    new[:keep].copy_(old[:keep])
        for new, old in zip(bank.weights(), self.weights()):
            if new is not None and old is not None:
                new.requires_grad_(old.requires_grad)
        return bank

    def selected(self, experts: list[int]) -> ExpertBank:
        """A new bank holding only ``experts`` (in that order): how one task's experts are exported."""
        bank = self.resized(len(experts))
        index = torch.tensor(experts, dtype=torch.long, device=self.w_down.device)
        with torch.no_grad():
            for new, old in zip(bank.weights(), self.weights()):
                if new is not None and old is not None:
                    new.copy_(old.index_select(0, index))
        return bank

    def extra_repr(self) -> str:
        widths = f"width={self.width}" + (f", out_width={self.out_width}" if self.out_width != self.width else "")
        return f"experts={self.num_experts}, {widths}, rank={self.rank}, activation={self.activation}"


#: w_down, b_down, w_up, b_up of several banks stacked along the expert dimension
StackedWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def stacked_weights(banks: list[ExpertBank]) -> StackedWeights:
    """The weights of several banks as one stack (task experts first, then shared ones)."""
    if len(banks) == 1:
        bank = banks[0]
        return bank.w_down, bank.b_down, bank.w_up, bank.b_up

    def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if any(t is None for t in tensors):
            return None
        return torch.cat([t for t in tensors if t is not None], dim=0)

    w_down = torch.cat([b.w_down for b in banks], dim=0)
    w_up = torch.cat([b.w_up for b in banks], dim=0)
    return w_down, cat([b.b_down for b in banks]), w_up, cat([b.b_up for b in banks])


def concat_banks(banks: list[ExpertBank]) -> ExpertBank:
    """One bank holding the experts of ``banks`` in order (task experts, then shared ones), as a copy."""
    if len(banks) == 1:
        return banks[0]
    combined = banks[0].resized(sum(b.num_experts for b in banks))
    with torch.no_grad():
        for target, source in zip(combined.weights(), stacked_weights(banks)):
            if target is not None and source is not None:
                target.copy_(source)
    return combined
