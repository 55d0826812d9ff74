"""How stages change an MTA model: experts added (shared ones, or a new task with its own), the router
switched, the trainable set chosen. ``apply_stage`` is the one entry a stage uses; each step keeps the model's
function where it can (new experts start at zero output unless told to copy one)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from alter_ds.config import RouterConfig, StageConfig, TaskConfig
from alter_ds.errors import UsageError
from alter_ds.mta.block import MTABlock
from alter_ds.mta.experts import ExpertBank, concat_banks
from alter_ds.mta.inject import init_banks
from alter_ds.mta.layer_experts import LayerBank
from alter_ds.mta.routers import ExpertLayout

if TYPE_CHECKING:
    from alter_ds.mta.model import MTAModel


def set_router(model: MTAModel, config: RouterConfig) -> None:
    """Give every block a router of this config (learned state carried over where names match)."""
    if config.kind == "task_embedding":
        model.ensure_task_embeddings(config.task_embedding_dim)
    for block in model.blocks.values():
        block.set_router(config, model.layout)
    model.router_config = config


def add_shared_experts(model: MTAModel, count: int, init: str = "zeros", source_expert: int | None = None) -> None:
    """Add ``count`` shared experts to every block, initialised as asked (see ``_init_new_experts``)."""
    if count <= 0:
        return
    if any(isinstance(block.task_experts, LayerBank) for block in model.blocks.values()):
        raise UsageError("layer experts have no shared experts: a stage cannot add_experts.shared to them")
    old = model.layout.num_shared_experts
    model.layout = dataclasses.replace(model.layout, num_shared_experts=old + count)
    for block in model.blocks.values():
        if block.shared_experts is None:
            bank = block.task_experts.resized(count)
            for tensor in bank.weights():
                if tensor is not None:
                    tensor.requires_grad_(True)
            block.shared_experts = bank
            new = slice(0, count)
        else:
            block.shared_experts = block.shared_experts.resized(old + count)
            new = slice(old, old + count)
        _init_new_experts(block, block.shared_experts, new, init, source_expert)
    set_router(model, model.router_config)


def add_task(
    model: MTAModel,
    name: str,
    category: str = "default",
    init: str = "zeros",
    source_expert: int | None = None,
    experts: list[int] | None = None,
) -> int:
    """Add a task with its own new task expert in every block, or, with ``experts``, assigned those existing
    task experts (no bank grows); returns its id."""
    if name in model.task_names:
        raise UsageError(f"task {name!r} already exists")
    known = model.layout.num_task_experts
    if experts is not None and not all(0 <= e < known for e in experts):
        raise UsageError(f"task {name!r} is assigned experts {experts}; the bank has {known} task experts")
    model.tasks.append(TaskConfig(name, category))
    model.task_names.append(name)  # shared list: blocks and routers see it
    model.layout = ExpertLayout(
        model.layout.num_tasks + 1,
        known + (experts is None),
        model.layout.num_shared_experts,
        [*model.layout.task_experts, list(experts) if experts is not None else [known]],
    )
    if model.task_embeddings is not None:  # the new task's vector starts at the mean of the known ones
        old_table = model.task_embeddings
        table = torch.nn.Embedding(
            len(model.tasks), old_table.embedding_dim, device=old_table.weight.device, dtype=old_table.weight.dtype
        )
        with torch.no_grad():
            table.weight[:-1].copy_(old_table.weight)
            table.weight[-1].copy_(old_table.weight.mean(0))
        table.weight.requires_grad_(old_table.weight.requires_grad)
        model.task_embeddings = table
        model.context.task_embeddings = table
    if experts is None:
        for block in model.blocks.values():
            block.task_experts = block.task_experts.resized(known + 1)
            _init_new_experts(block, block.task_experts, slice(known, known + 1), init, source_expert)
    set_router(model, model.router_config)
    return len(model.tasks) - 1


def apply_stage(model: MTAModel, stage: StageConfig) -> dict[str, tuple[int, int]]:
    """Make the model what ``stage`` trains: add its experts, set its router, choose its trainable set."""
    add = stage.add_experts
    if stage.reset_experts:
        reset_experts(model)
    add_shared_experts(model, add.shared, add.init, add.source_expert)
    set_router(model, stage.router)
    return model.set_trainable(stage.train)


def reset_experts(model: MTAModel) -> None:
    """Every expert back to where injection started it (``inject.init_banks``): layer and FFN copies from the
    pretrained layer or FFN (the task-level MoE's stage 2 re-initialises its experts so), adapters at zero."""
    for block in model.blocks.values():
        if isinstance(block.task_experts, LayerBank):
            block.task_experts.init_pretrained()
        else:
            pretrained = block.task_experts.pretrained()
            init_banks(block.task_experts, block.shared_experts, pretrained, model.mta_config.shared_init)


def _init_new_experts(
    block: MTABlock, bank: ExpertBank | LayerBank, new: slice, init: str, source_expert: int | None
) -> None:
    """zeros: output starts at exactly zero (up projection zero, down projection random, so it can learn);
    pretrained: a copy of the layer's pretrained FFN (ffn experts); expert: a copy of expert ``source_expert``.
    Layer experts always start as copies: of the pretrained layer (zeros or pretrained), or of an expert."""
    if isinstance(bank, LayerBank):
        if init == "expert":
            if source_expert is None or not 0 <= source_expert < bank.num_experts:
                raise UsageError(f"init: expert needs source_expert in [0, {bank.num_experts}), got {source_expert}")
            bank.init_from_expert(source_expert, new)
        elif init in ("zeros", "pretrained"):
            bank.init_pretrained(new)
        else:
            raise UsageError(f"unknown expert init {init!r} (zeros, pretrained, expert)")
        return
    if init == "zeros":
        bank.init_bottleneck(new)
    elif init == "pretrained":
        source = block.task_experts.pretrained()
        if source is None:
            raise UsageError("init: pretrained copies the layer's pretrained FFN and needs expert_kind: ffn")
        bank.init_from_feed_forward(source, new)
    elif init == "expert":
        banks = [block.task_experts] + ([block.shared_experts] if block.shared_experts is not None else [])
        combined = concat_banks(banks)
        if source_expert is None or not 0 <= source_expert < combined.num_experts:
            raise UsageError(f"init: expert needs source_expert in [0, {combined.num_experts}), got {source_expert}")
        with torch.no_grad():
            for target, origin in zip(bank.weights(), combined.weights()):
                if target is not None and origin is not None:
                    target[new].copy_(origin[source_expert])
    else:
        raise UsageError(f"unknown expert init {init!r} (zeros, pretrained, expert)")
