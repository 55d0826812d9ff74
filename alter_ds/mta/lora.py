"""LoRA experts: a routed mixture of low-rank updates beside chosen linear projections.

A targeted projection ``W`` (an ``nn.Linear``, or GPT-2's ``Conv1D``) computes
``W·x + (alpha / r) · Σ_j w_j · B_j(A_j · x)``: the task's mixture weights ``w_j`` come from the block's router,
exactly as for the other expert kinds, and every expert's A and B are one stacked ``ExpertBank`` (identity
activation, no biases), so one grouped-op call serves all experts of a projection and ZeRO-2 sees the same
gradient tensors on every rank. B starts at zero, so a fresh model is the backbone.

Each projection is its own block with its own router (as MoLoRA and MixLoRA do): a ``q`` and a ``v`` of the same
layer may route differently. With a task-level router a task's mixture is fixed, so it folds into one plain LoRA
of rank ``Σ r`` per projection (``peft_export.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alter_ds.mta.block import MTABlock
from alter_ds.mta.inject import (
    ATTENTION_OUTPUT_NAMES,
    InjectionError,
    MTAWrapped,
    find_attention_output,
    find_ffn,
    in_out_weight,
)

#: projection aliases: the module holding them (self-attention or FFN) and the child names they go by
TARGET_ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "q": ("attention", ("q_proj", "q", "query")),
    "k": ("attention", ("k_proj", "k", "key")),
    "v": ("attention", ("v_proj", "v", "value")),
    "o": ("attention", ATTENTION_OUTPUT_NAMES),
    "gate": ("ffn", ("gate_proj", "wi_0", "w1")),
    "up": ("ffn", ("up_proj", "gate_up_proj", "wi_1", "w3", "wi", "fc1", "c_fc", "fc_in", "dense_h_to_4h")),
    "down": ("ffn", ("down_proj", "wo", "w2", "fc2", "c_proj", "fc_out", "dense_4h_to_h")),
}
#: projections that compute q, k and v in one matrix: LoRA targets them by their own name
FUSED_ATTENTION_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "in_proj")


def _is_projection(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_lora_targets(layer: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module, str]]:
    """``(target, owner, child name)`` of every projection ``targets`` names in ``layer``, in the order given.

    Aliases look in the layer's self-attention (q, k, v, o) or feed-forward (gate, up, down) module; any other
    target is an exact child name, matched anywhere in the layer (PEFT's ``target_modules`` semantics)."""
    found: list[tuple[str, nn.Module, str]] = []
    for target in targets:
        if target in TARGET_ALIASES:
            found.append((target, *_alias(layer, target)))
            continue
        matches = [
            (module, name)
            for module in layer.modules()
            for name, child in module.named_children()
            if name == target and _is_projection(child)
        ]
        if not matches:
            raise InjectionError(
                f"lora_targets: no projection named {target!r} in {type(layer).__name__} (aliases: "
                f"{', '.join(TARGET_ALIASES)}; linear children found: {_projection_names(layer)})"
            )
        found += [(target, owner, name) for owner, name in matches]
    seen: dict[int, str] = {}
    for target, owner, name in found:
        key = id(getattr(owner, name))
        if key in seen:
            raise InjectionError(f"lora_targets: {seen[key]!r} and {target!r} name the same projection {name!r}")
        seen[key] = target
    return found


def _alias(layer: nn.Module, target: str) -> tuple[nn.Module, str]:
    where, names = TARGET_ALIASES[target]
    owner = find_attention_output(layer)[0] if where == "attention" else find_ffn(layer)[0]
    for name in names:
        if _is_projection(owner._modules.get(name)):
            return owner, name
    fused = [n for n in FUSED_ATTENTION_NAMES if _is_projection(owner._modules.get(n))]
    hint = f"; {type(owner).__name__} computes q, k and v in one projection: target {fused[0]!r}" if fused else ""
    children = sorted(n for n, c in owner.named_children() if _is_projection(c))
    raise InjectionError(
        f"lora_targets: {target!r} (one of {names}) not found in {type(owner).__name__} of {type(layer).__name__} "
        f"(linear children found: {children}){hint}"
    )


def _projection_names(layer: nn.Module) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path, module in layer.named_modules() if _is_projection(module)})


def projection_widths(projection: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a targeted projection."""
    weight = in_out_weight(projection)[0]
    return int(weight.shape[0]), int(weight.shape[1])


class LoRABlock(MTABlock):
    """The routed LoRA update of one projection: ``scaling · Σ_j w_j B_j A_j dropout(x)`` (the wrapper adds
    ``W·x``). ``scaling`` is ``lora_alpha / r``; dropout acts on the input, as PEFT's ``lora_dropout`` does."""

    def adapted(self, hidden: torch.Tensor) -> torch.Tensor:
        """LoRA's dropout is on the input (PEFT's ``lora_dropout``), and the result is added to the projection's
        output by ``LoRAWrapped``, not to the input."""
        return self.mixture(hidden, self.dropout(hidden)) * self.scaling

    def pretrained_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's projection gets nothing added."""
        return hidden.new_zeros(*hidden.shape[:-1], self.task_experts.out_width)


class LoRAWrapped(MTAWrapped):
    """A projection with its LoRA block beside it: ``base(x) + mta(x)``."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs) + self.mta(args[0] if args else kwargs["input"])
