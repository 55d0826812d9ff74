"""Layer experts (the task-level MoE): m copies of a whole transformer layer, mixed by a router.

A ``LayerExpertBlock`` takes the place of one layer of a stack and is called exactly like it. Each copy starts
as the pretrained layer plus Gaussian noise (std ``mta.layer_noise``, 1e-8 in the paper), so at init the
block computes the layer it replaced.

- **Training** (any forward with gradients on) runs every copy on every example, in a fixed order, and
  mixes their outputs with the router's per-example weights. Every rank then builds the same graph whatever
  its tasks, which keeps ZeRO-2's bucketed gradient reduction correct with experts held as separate modules
  (tests/test_zero2_experts.py fails without it).
- **Evaluation and generation** (no gradients) run only the copies some example of the batch routes to
  (for a one-hot route: one copy per example, the paper's argmax execution), and skip the others.
- **KV cache.** Copy 0 keeps the layer's own cache slot; copy j of layer i in a stack of L layers caches at
  slot ``j * L + i``, added to the model's dynamic cache the first time it is needed. Beam search reorders
  those slots with the rest.
"""

from __future__ import annotations

import copy
import typing
from typing import Any

import torch
from torch import nn

from alter_ds.errors import UsageError
from alter_ds.mta.block import MTABlock


def _cache_slots(module: nn.Module) -> list[nn.Module]:
    """The submodules that address a KV cache by ``layer_idx`` (the attention modules of a layer)."""
    return [m for m in module.modules() if isinstance(getattr(m, "layer_idx", None), int)]


class LayerBank(nn.Module):
    """``num_experts`` copies of one layer, plus the pretrained layer they are (re)initialised from.

    The pretrained layer is kept outside the module tree (not trained, not saved with the MTA weights: a
    backbone loaded by reference has it, and a saved backbone stores it beside its own weights).
    """

    def __init__(
        self,
        pretrained: nn.Module,
        num_experts: int,
        width: int,
        layer_index: int,
        stack_layers: int,
        noise: float,
        experts: list[nn.Module] | None = None,
    ):
        super().__init__()
        object.__setattr__(self, "_pretrained", pretrained)
        self.width = width
        self.layer_index = layer_index
        self.stack_layers = stack_layers
        self.noise = noise
        self.experts = nn.ModuleList(
            experts if experts is not None else [self.fresh_copy() for _ in range(num_experts)]
        )
        self._assign_slots()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def pretrained_layer(self) -> nn.Module:
        layer: nn.Module = self.__dict__["_pretrained"]
        return layer

    def fresh_copy(self) -> nn.Module:
        """The pretrained layer plus N(0, noise) on every floating-point weight, trainable, on the bank's device."""
        layer = copy.deepcopy(self.pretrained_layer())
        reference = next((e for e in self.experts.parameters()), None) if "experts" in self._modules else None
        if reference is not None:
            layer = layer.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
                if self.noise and parameter.is_floating_point():
                    parameter.add_(torch.randn_like(parameter) * self.noise)
        return layer

    def _assign_slots(self) -> None:
        for number, expert in enumerate(self.experts):
            for module in _cache_slots(expert):
                setattr(module, "layer_idx", number * self.stack_layers + self.layer_index)  # noqa: B010

    def init_pretrained(self, experts: slice | None = None) -> None:
        """Start the given copies (all by default) again from the pretrained layer (plus noise)."""
        for index in range(self.num_experts)[experts if experts is not None else slice(None)]:
            self.experts[index] = self.fresh_copy()
        self._assign_slots()

    def init_from_expert(self, source: int, experts: slice) -> None:
        for index in range(self.num_experts)[experts]:
            self.experts[index].load_state_dict(self.experts[source].state_dict())

    def random_perturb(self, std: float, generator: torch.Generator | None = None) -> None:
        """Add Gaussian noise to every weight of every copy (tests: copies that differ show routing bugs)."""
        with torch.no_grad():
            for parameter in self.experts.parameters():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.add_(noise.to(device=parameter.device, dtype=parameter.dtype))

    def _with(self, experts: list[nn.Module]) -> LayerBank:
        return LayerBank(
            self.pretrained_layer(), len(experts), self.width, self.layer_index, self.stack_layers, self.noise, experts
        )

    def resized(self, num_experts: int) -> LayerBank:
        """A bank of ``num_experts`` copies: this bank's first ones, then fresh pretrained copies."""
        kept = list(self.experts)[:num_experts]
        return self._with(kept + [self.fresh_copy() for _ in range(num_experts - len(kept))])

    def selected(self, experts: list[int]) -> LayerBank:
        """Only ``experts``, in that order (how one task's copies are exported)."""
        return self._with([copy.deepcopy(self.experts[i]) for i in experts])

    def extra_repr(self) -> str:
        return f"copies={self.num_experts} of layer {self.layer_index}, noise={self.noise}"


class LayerExpertBlock(MTABlock):
    """A layer's place in its stack, held by routed copies of it (see the module docstring)."""

    task_experts: LayerBank  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not self.router.example_level:
            raise UsageError("layer experts need an example-level router (one route per example), not 'token'")
        if self.shared_experts is not None:
            raise UsageError("layer experts have no shared experts: set mta.num_shared_experts to 0")

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.context.pretrained_only:
            layer = self.task_experts.pretrained_layer()
            reference = next(layer.parameters())
            if (reference.device, reference.dtype) != (hidden.device, hidden.dtype):
                layer.to(device=hidden.device, dtype=hidden.dtype)  # MTAModel.pretrained_only moves it back
            return layer(*args, **kwargs)
        expert_ids, expert_weights = self.route(hidden)
        batch = hidden.shape[0]
        experts = self.task_experts.experts
        dense = torch.zeros(batch, len(experts), dtype=expert_weights.dtype, device=hidden.device)
        dense.scatter_add_(1, expert_ids, expert_weights)
        if torch.is_grad_enabled():
            # every copy, always, in order: the same graph on every rank (ZeRO-2), and each copy's output for
            # the router's gradient (a straight-through route's weight j needs copy j's output)
            running = list(range(len(experts)))
        else:
            running = [j for j in range(len(experts)) if bool((dense[:, j] != 0).any())]
        self._extend_caches(args, kwargs, running)
        outputs = [experts[j](*args, **kwargs) for j in running]
        weights = [dense[:, j] for j in running]
        if isinstance(outputs[0], tuple):
            # every per-example tensor is mixed (T5's position bias: an example keeps its own copy's bias);
            # anything else (attention weights off, a cache) comes from the first copy run
            return tuple(_mix([o[i] for o in outputs], weights, batch) for i in range(len(outputs[0])))
        return _mix(outputs, weights, batch)

    def _extend_caches(self, args: tuple[Any, ...], kwargs: dict[str, Any], running: list[int]) -> None:
        """Give the copies that run their own cache slots (see the module docstring)."""
        from transformers.cache_utils import Cache

        needed = max(running) * self.task_experts.stack_layers + self.task_experts.layer_index
        for value in (*args, *kwargs.values()):
            if not isinstance(value, Cache):
                continue
            for cache in (getattr(value, "self_attention_cache", None), getattr(value, "cross_attention_cache", None)):
                if isinstance(cache, Cache):
                    _extend(cache, needed, self.task_experts.layer_index)
            if not hasattr(value, "self_attention_cache"):
                _extend(value, needed, self.task_experts.layer_index)

    def expert_weights(self) -> Any:  # the grouped op is not used: each copy is a whole layer
        raise TypeError("layer experts have no stacked adapter weights")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # stock stacks read attributes of the layer they expect (Llama's ``attention_type``)
            bank = typing.cast(LayerBank, super().__getattr__("task_experts"))
            return getattr(bank.experts[0], name)


def _mix(values: list[Any], weights: list[torch.Tensor], batch: int) -> Any:
    """``sum_j w_j * values_j`` per example for floating-point tensors with one row per example (or one row
    for all, broadcast: T5's position bias), else the first value. One value is returned as it is."""
    first = values[0]
    if len(values) == 1 and bool((weights[0] == 1).all()):
        return first
    per_example = isinstance(first, torch.Tensor) and first.is_floating_point() and first.dim() > 0
    if not per_example or first.shape[0] not in (1, batch):
        return first
    mixed = None
    for value, weight in zip(values, weights):
        value = value.expand(batch, *value.shape[1:])
        term = weight.to(value.dtype).view(batch, *([1] * (value.dim() - 1))) * value
        mixed = term if mixed is None else mixed + term
    return mixed


def _extend(cache: Any, slot: int, like: int) -> None:
    """Make ``cache`` address ``slot``: new layers of the kind its layer ``like`` is."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or getattr(cache, "layer_class_to_replicate", None) is not None:
        return  # a lazily growing cache makes its slots on first use
    while len(layers) <= slot:
        base = layers[like] if like < len(layers) else layers[-1]
        if isinstance(base, DynamicSlidingWindowLayer):
            layers.append(DynamicSlidingWindowLayer(sliding_window=base.sliding_window))
        elif type(base) is DynamicLayer:
            layers.append(DynamicLayer())
        else:
            raise UsageError(
                f"layer experts need a dynamic KV cache (each copy caches its own keys); got {type(base).__name__}"
            )
