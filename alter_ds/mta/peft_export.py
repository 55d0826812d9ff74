"""One task of a LoRA-expert model as the ecosystem's formats: a PEFT LoRA adapter, or merged weights.

With a task-level router a task's mixture over a projection's experts is a fixed vector ``w``, so its update
``(alpha / r) · Σ_e w_e B_e A_e x`` is exactly one LoRA of rank ``Σ_{w_e ≠ 0} r``: stack the kept experts' A's,
and scale and stack their B's (shared experts included). PEFT computes ``(lora_alpha / rank) · B A x``; the
export sets ``lora_alpha = rank`` for every module, so the folded B carries the whole scale.

The adapter is written without importing PEFT (a test and benchmark dependency, not a runtime one), in the
layout ``PeftModel.from_pretrained`` reads: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``[rank, in]``) and ``.lora_B.weight`` (``[out, rank]``).
"""

from __future__ import annotations

import json
import os
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from alter_ds.errors import UsageError
from alter_ds.mta.artifact import backbone_state_dict, write_directory
from alter_ds.mta.experts import stacked_weights
from alter_ds.mta.routers import TaskLevelRouter

if TYPE_CHECKING:
    from alter_ds.mta.model import MTAModel

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
#: what PeftModel puts before a module's path in an adapter's weights
PEFT_PREFIX = "base_model.model."


@dataclass
class FoldedLoRA:
    """One projection's update for one task as a plain LoRA: ``delta(x) = B @ (A @ x)``, scale folded into B."""

    module: str  # the projection's path in the backbone
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    conv1d: bool  # GPT-2's Conv1D stores its weight as [in, out] (PEFT's fan_in_fan_out)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """The update in the projection's own weight layout."""
        delta = self.b @ self.a  # [out, in], nn.Linear's layout
        return delta.t() if self.conv1d else delta


def _lora_modules(model: MTAModel) -> dict[str, tuple[str, Any]]:
    """Block name -> (path of the wrapped projection in the backbone, the wrapper)."""
    from alter_ds.mta.lora import LoRABlock, LoRAWrapped

    if not model.blocks or not all(isinstance(b, LoRABlock) for b in model.blocks.values()):
        kind = model.mta_config.expert_kind
        raise UsageError(
            f"this model's experts are {kind!r}: only lora experts are low-rank updates of a projection, so only "
            f"they export as a PEFT LoRA or merge into the weights; {kind} experts export as an alter-ds model "
            f"(--format alter-ds), which MTAModel.from_pretrained loads"
        )
    found = {
        id(module.mta): (path, module)
        for path, module in model.backbone.named_modules()
        if isinstance(module, LoRAWrapped)
    }
    return {name: found[id(block)] for name, block in model.blocks.items()}


@torch.no_grad()
def fold_task(model: MTAModel, task: str | int) -> list[FoldedLoRA]:
    """The task's update of every targeted projection as a plain LoRA (projections it gives no weight skipped)."""
    task_index = model.task_id(task)
    folded: list[FoldedLoRA] = []
    for block_name, (path, wrapper) in _lora_modules(model).items():
        block = model.blocks[block_name]
        if not isinstance(block.router, TaskLevelRouter):
            raise UsageError(
                f"block {block_name} routes with a {block.router.config.kind!r} router, whose mixture depends on "
                f"the input: a task's update is not one LoRA; export as an alter-ds model (--format alter-ds)"
            )
        row = block.router.task_mixture(model.context.step)[task_index].float()
        kept = [int(e) for e in torch.nonzero(row).flatten()]
        if not kept:
            continue
        banks = [block.task_experts] + ([block.shared_experts] if block.shared_experts is not None else [])
        w_down, _, w_up, _ = stacked_weights(banks)
        a = torch.cat([w_down[e].float().t() for e in kept])  # [rank, in]
        b = torch.cat([(row[e] * block.scaling) * w_up[e].float().t() for e in kept], dim=1)  # [out, rank]
        folded.append(FoldedLoRA(path, a.contiguous(), b.contiguous(), type(wrapper.base_layer).__name__ == "Conv1D"))
    return folded


def export_peft(
    model: MTAModel, directory: str | os.PathLike[str], task: str | int, base_model: str | None = None
) -> Path:
    """Write the task's experts as a PEFT LoRA adapter; ``base_model`` goes to ``base_model_name_or_path``
    (default: the backbone's reference). Written into a temporary sibling and renamed into place."""
    folded = fold_task(model, task)
    if not folded:
        raise UsageError(f"task {model.task_names[model.task_id(task)]!r} gives no weight to any expert")
    ranks = Counter(f.rank for f in folded)
    rank = ranks.most_common(1)[0][0]
    others = {f.module: f.rank for f in folded if f.rank != rank}
    dtype = next(iter(model.blocks.values())).task_experts.w_down.dtype
    reference = model.backbone_reference or {}
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if model.is_encoder_decoder else "CAUSAL_LM",
        "base_model_name_or_path": base_model or reference.get("name_or_path"),
        "r": rank,
        "lora_alpha": rank,  # scale 1: the folded B carries alpha / r and the mixture weights
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": [f.module for f in folded],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(f.conv1d for f in folded),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for f in folded:
        tensors[f"{PEFT_PREFIX}{f.module}.lora_A.weight"] = f.a.to(dtype)
        tensors[f"{PEFT_PREFIX}{f.module}.lora_B.weight"] = f.b.to(dtype)
    root = Path(directory)

    def write(staging: Path) -> None:
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})

    write_directory(root, write)
    return root


def merged_state_dict(model: MTAModel, task: str | int) -> dict[str, torch.Tensor]:
    """The backbone's weights with the task's update added to each targeted projection, under the stock
    model's parameter names (the wrappers' ``base_layer.`` removed)."""
    deltas = {f"{f.module}.weight": f.delta_weight() for f in fold_task(model, task)}  # checks the experts
    wrapped = {path for path, _ in _lora_modules(model).values()}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in backbone_state_dict(model).items():
        path, inside, rest = key.rpartition(".base_layer.")
        if inside and path in wrapped:
            key = f"{path}.{rest}"
        if key in deltas:
            tensor = (tensor.float() + deltas[key]).to(tensor.dtype)
        state[key] = tensor
    return state


def export_merged(model: MTAModel, directory: str | os.PathLike[str], task: str | int, tokenizer: Any = None) -> Path:
    """Write a plain Hugging Face model directory (``from_pretrained`` of the backbone's class loads it) with the
    task's update merged into the weights; the tokenizer too when given."""
    state = merged_state_dict(model, task)
    backbone = typing.cast(Any, model.backbone)
    root = Path(directory)

    def write(staging: Path) -> None:
        backbone.save_pretrained(str(staging), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    write_directory(root, write)
    return root
