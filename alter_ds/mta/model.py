"""MTAModel: a stock transformers model with MTA blocks, task-aware forward/generate, stages and one artefact.

The wrapper owns the routing context that every block reads: ``forward(..., task_ids, prompt_mask)`` and
``generate(..., task_ids)`` set it, so the backbone's own ``forward`` and ``generate`` run unchanged (greedy,
beam search, KV cache, mixed-task batches). Stages change the model only through ``apply_stage``: add experts,
switch the router, choose what trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alter_ds.config import (
    PARAMETER_GROUPS,
    ExperimentConfig,
    MTAConfig,
    RouterConfig,
    StageConfig,
    TaskConfig,
    config_from_dict,
)
from alter_ds.errors import MissingFileError, UsageError
from alter_ds.mta.block import MTABlock, RoutingContext, pool_prompt
from alter_ds.mta.experts import ExpertBank, FeedForwardWeights, stacked_weights
from alter_ds.mta.inject import inject_mta
from alter_ds.mta.routers import ExpertLayout, GateRouter, TaskLevelRouter, TokenRouter, frozen_config

FORMAT_VERSION = 1
CONFIG_FILE = "mta_config.json"
TASKS_FILE = "tasks.json"
WEIGHTS_FILE = "mta.safetensors"
BACKBONE_DIR = "backbone"
#: saved with a backbone: the FFN each ffn bank was copied from (replace_ffn removes it from the backbone)
PRETRAINED_FFN_PREFIX = "mta_pretrained_ffn."


def build_layout(config: MTAConfig, tasks: Sequence[TaskConfig]) -> ExpertLayout:
    """Task experts (one per task unless configured) and each task's assigned experts (the prior map)."""
    num_task_experts = config.num_task_experts or len(tasks)
    assigned = []
    for index, task in enumerate(tasks):
        experts = config.task_experts.get(task.name, [index % num_task_experts])
        for expert in experts:
            if not 0 <= expert < num_task_experts:
                raise UsageError(f"task {task.name!r} is assigned expert {expert}; the bank has {num_task_experts}")
        assigned.append(list(experts))
    return ExpertLayout(len(tasks), num_task_experts, config.num_shared_experts, assigned)


def build_model(config: ExperimentConfig, backbone: nn.Module | None = None) -> MTAModel:
    """The experiment's model before its first stage: the backbone (loaded from ``config.model`` unless given)
    with MTA blocks routed by the first stage's router. Stages then apply themselves with ``apply_stage``."""
    from alter_ds.mta.backbone import load_backbone

    reference = None
    if backbone is None:
        backbone = load_backbone(config.model)
        reference = dataclasses.asdict(config.model)
    router = config.stages[0].router if config.stages else RouterConfig()
    return MTAModel(backbone, config.mta, config.tasks, router, backbone_reference=reference)


class MTAModel(nn.Module):
    """A backbone with Mixture-of-Task-Adapters blocks; see the module docstring."""

    def __init__(
        self,
        backbone: nn.Module,
        mta_config: MTAConfig,
        tasks: Sequence[TaskConfig],
        router: RouterConfig | None = None,
        layout: ExpertLayout | None = None,
        backbone_reference: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.mta_config = mta_config
        self.tasks = [TaskConfig(t.name, t.category) for t in tasks]
        self.task_names = [t.name for t in self.tasks]
        self.layout = layout or build_layout(mta_config, self.tasks)
        self.router_config = router or RouterConfig()
        self.backbone_reference = backbone_reference
        self.context = RoutingContext()
        result = inject_mta(backbone, mta_config, self.router_config, self.layout, self.task_names, self.context)
        self._blocks = result.blocks  # also submodules of the backbone; kept here by name, not re-registered
        self._hooks = result.hooks

    # ------------------------------------------------------------------------------------ access
    @property
    def blocks(self) -> dict[str, MTABlock]:
        return self._blocks

    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.backbone.config, "is_encoder_decoder", False))

    def task_id(self, task: str | int) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise UsageError(f"unknown task {task!r}; the model's tasks are {self.task_names}")
            return self.task_names.index(task)
        if not 0 <= int(task) < len(self.tasks):
            raise UsageError(f"task id {task} out of range: the model has {len(self.tasks)} tasks {self.task_names}")
        return int(task)

    def resolve_task_ids(self, task_ids: Any, batch: int | None, device: torch.device) -> torch.Tensor:
        """Task ids as a ``[B]`` int64 tensor, from ids or names; one clear error for anything else."""
        if task_ids is None:
            raise ValueError("task_ids is required: one task id or task name per example")
        if isinstance(task_ids, (str, int)):
            task_ids = [task_ids]
        if isinstance(task_ids, torch.Tensor):
            if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
                raise ValueError(f"task_ids must be integers, got dtype {task_ids.dtype}")
            if task_ids.dim() != 1:
                raise ValueError(f"task_ids must be 1-D with one id per example, got shape {tuple(task_ids.shape)}")
            ids = task_ids.to(device=device, dtype=torch.long)
        else:
            ids = torch.tensor([self.task_id(t) for t in task_ids], dtype=torch.long, device=device)
        if batch is not None and ids.shape[0] != batch:
            raise ValueError(f"task_ids has {ids.shape[0]} entries for a batch of {batch} examples")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.tasks)):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"task id {bad} out of range: the model has {len(self.tasks)} tasks {self.task_names}")
        return ids

    @staticmethod
    def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs")):
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
        return None

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ---------------------------------------------------------------------------- forward/generate
    def forward(self, *args: Any, task_ids: Any = None, prompt_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The backbone's forward with each example routed by its task.

        ``prompt_mask [B, T]`` marks the prompt tokens of a decoder-only batch (gates pool over them only, as
        in ``generate``); without it the attention mask is used. The routing lasts for this call only (a later
        bare backbone call gets a clear error, not this batch's task ids); layers under activation checkpointing
        replay it when backward recomputes them.
        """
        with self.routed(task_ids, self._batch_size(args, kwargs), prompt_mask):
            encoder_outputs = kwargs.get("encoder_outputs")
            if self.is_encoder_decoder and encoder_outputs is not None:
                hidden = (
                    encoder_outputs[0]
                    if isinstance(encoder_outputs, (tuple, list))
                    else encoder_outputs.last_hidden_state
                )
                self.context.encoder_features = pool_prompt(hidden, kwargs.get("attention_mask"))
            return self.backbone(*args, **kwargs)

    def activation_checkpointing_enable(self, **checkpoint_kwargs: Any) -> None:
        """Recompute the backbone's layers in backward instead of keeping their activations (HF's activation
        checkpointing, non-reentrant unless told otherwise), with the routing of each forward replayed."""
        backbone = typing.cast(Any, self.backbone)
        checkpoint_kwargs = {"use_reentrant": False, **checkpoint_kwargs}
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        wrapped = 0
        for module in backbone.modules():
            function = getattr(module, "_gradient_checkpointing_func", None)
            if function is not None:
                module._gradient_checkpointing_func = self.context.checkpointing(function)
                wrapped += 1
        if not wrapped:
            raise UsageError(f"{type(backbone).__name__} does not support activation checkpointing")

    @torch.no_grad()
    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """``backbone.generate`` with task routing: greedy, sampling and beam search, with the KV cache.

        Rows expanded by generate (beams, return sequences) inherit their example's task; gate features are
        pooled on the prompt forward and reused for every generated token.
        """
        with self.routed(task_ids, self._batch_size(args, kwargs), generating=True):
            return typing.cast(Any, self.backbone).generate(*args, **kwargs)

    @contextlib.contextmanager
    def routed(
        self, task_ids: Any, batch: int | None = None, prompt_mask: torch.Tensor | None = None, generating: bool = False
    ) -> Iterator[torch.Tensor]:
        """Route the backbone calls made inside the block by ``task_ids``; cleared on exit.

        ``generating=True`` is how several backbone calls share one prompt: the first call pools the gate
        features over its tokens and later calls (more tokens after a KV cache, rows repeated per prompt)
        reuse them, as ``generate`` does.
        """
        ids = self.resolve_task_ids(task_ids, batch, self._device())
        self.context.reset(ids, prompt_mask, generating=generating)
        try:
            yield ids
        finally:
            self.context.reset(None, None, generating=False)

    def set_step(self, step: int) -> None:
        """The optimizer step the temperature schedules read."""
        self.context.step = int(step)

    # ---------------------------------------------------------------------------- parameter groups
    def named_parameter_groups(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(group, name, parameter) for every parameter; groups: backbone, task_experts, shared_experts, router."""
        owners: dict[int, str] = {}
        for block in self.blocks.values():
            for group, module in (
                ("task_experts", block.task_experts),
                ("shared_experts", block.shared_experts),
                ("router", block.router),
            ):
                if module is not None:
                    for parameter in module.parameters():
                        owners[id(parameter)] = group
        for name, parameter in self.named_parameters():
            yield owners.get(id(parameter), "backbone"), name, parameter

    def set_trainable(self, train: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Train exactly the named groups and the parameters matching the fnmatch patterns; freeze the rest."""
        entries = list(train)
        matched = {entry: False for entry in entries}
        for group, name, parameter in self.named_parameter_groups():
            hits = [e for e in entries if e == group or (e not in PARAMETER_GROUPS and fnmatch.fnmatchcase(name, e))]
            for entry in hits:
                matched[entry] = True
            parameter.requires_grad_(bool(hits))
        for entry, hit in matched.items():
            if not hit and entry not in PARAMETER_GROUPS:
                raise UsageError(
                    f"train entry {entry!r} matches no parameter group ({', '.join(PARAMETER_GROUPS)}) "
                    f"and no parameter name"
                )
        return self.parameter_counts()

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """{group: (trainable, total)} parameter counts."""
        counts = {group: [0, 0] for group in PARAMETER_GROUPS}
        for group, _, parameter in self.named_parameter_groups():
            counts[group][1] += parameter.numel()
            if parameter.requires_grad:
                counts[group][0] += parameter.numel()
        return {group: (c[0], c[1]) for group, c in counts.items()}

    def format_parameter_counts(self) -> str:
        counts = self.parameter_counts()
        total = sum(c[1] for c in counts.values())
        lines = [f"{'group':<16}{'trainable':>14}{'total':>14}{'% of model':>12}"]
        for group, (trainable, size) in counts.items():
            lines.append(f"{group:<16}{trainable:>14,}{size:>14,}{100 * trainable / max(total, 1):>11.3f}%")
        trainable_all = sum(c[0] for c in counts.values())
        lines.append(f"{'all':<16}{trainable_all:>14,}{total:>14,}{100 * trainable_all / max(total, 1):>11.3f}%")
        return "\n".join(lines)

    # -------------------------------------------------------------------------------- structure
    def set_router(self, config: RouterConfig) -> None:
        """Give every block a router of this config (learned state carried over where names match)."""
        for block in self.blocks.values():
            block.set_router(config, self.layout)
        self.router_config = config

    def add_shared_experts(self, count: int, init: str = "zeros", source_expert: int | None = None) -> None:
        """Add ``count`` shared experts to every block, initialised as asked (see ``_init_new_experts``)."""
        if count <= 0:
            return
        old = self.layout.num_shared_experts
        self.layout = dataclasses.replace(self.layout, num_shared_experts=old + count)
        for block in self.blocks.values():
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
            block.layout = self.layout
        self.set_router(self.router_config)

    def add_task(
        self, name: str, category: str = "default", init: str = "zeros", source_expert: int | None = None
    ) -> int:
        """Add a task with its own new task expert in every block; returns its id."""
        if name in self.task_names:
            raise UsageError(f"task {name!r} already exists")
        new_expert = self.layout.num_task_experts
        self.tasks.append(TaskConfig(name, category))
        self.task_names.append(name)  # shared list: blocks and routers see it
        self.layout = ExpertLayout(
            self.layout.num_tasks + 1,
            new_expert + 1,
            self.layout.num_shared_experts,
            [*self.layout.task_experts, [new_expert]],
        )
        for block in self.blocks.values():
            block.task_experts = block.task_experts.resized(new_expert + 1)
            _init_new_experts(block, block.task_experts, slice(new_expert, new_expert + 1), init, source_expert)
            block.layout = self.layout
        self.set_router(self.router_config)
        return len(self.tasks) - 1

    def apply_stage(self, stage: StageConfig) -> dict[str, tuple[int, int]]:
        """Make the model what ``stage`` trains: add its experts, set its router, choose its trainable set."""
        add = stage.add_experts
        self.add_shared_experts(add.shared, add.init, add.source_expert)
        self.set_router(stage.router)
        return self.set_trainable(stage.train)

    def task_mixtures(self) -> dict[str, torch.Tensor | None]:
        """Each block's ``[tasks, experts]`` mixture at evaluation (None for input-dependent routers)."""
        return {name: block.router.task_mixture(self.context.step) for name, block in self.blocks.items()}

    # -------------------------------------------------------------------------------- artefact
    def mta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every MTA tensor (experts, routers, their persistent buffers), keyed ``<block>.<name>``."""
        state: dict[str, torch.Tensor] = {}
        for block_name, block in self.blocks.items():
            for key, tensor in block.state_dict().items():
                state[f"{block_name}.{key}"] = tensor.detach().contiguous().clone()
        return state

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's own tensors (MTA tensors excluded), keyed as in the injected backbone."""
        mta_ids = {id(t) for block in self.blocks.values() for t in block.state_dict(keep_vars=True).values()}
        return {
            name: tensor.detach().contiguous().clone()
            for name, tensor in self.backbone.state_dict(keep_vars=True).items()
            if id(tensor) not in mta_ids
        }

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "architecture": type(self.backbone).__name__,
            "backbone": self.backbone_reference,
            "mta": dataclasses.asdict(self.mta_config),
            "router": dataclasses.asdict(self.router_config),
            "layout": dataclasses.asdict(self.layout),
            "step": self.context.step,
        }

    def _backbone_needs_saving(self, save_backbone: bool | None) -> bool:
        if save_backbone is not None:
            return save_backbone
        trained = any(p.requires_grad for g, _, p in self.named_parameter_groups() if g == "backbone")
        return trained or not self.backbone_reference

    def save_pretrained(self, directory: str | os.PathLike[str], save_backbone: bool | None = None) -> None:
        """Write the artefact: config, task table, MTA weights, and the backbone by reference or by value.

        The backbone's weights are written when a stage trained them or when it has no loadable reference
        (e.g. a model built from a config); ``save_backbone`` forces either way.
        """
        tasks = [{"name": t.name, "id": i, "category": t.category} for i, t in enumerate(self.tasks)]
        backbone = self._saved_backbone() if self._backbone_needs_saving(save_backbone) else None
        _write_artifact(Path(directory), self._metadata(), tasks, self.mta_state_dict(), backbone, self.backbone)

    def _saved_backbone(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors plus the pretrained FFNs the ffn banks were copied from: ``replace_ffn``
        removed those from the backbone, and experts added later with ``init: pretrained`` need them."""
        state = self.backbone_state_dict()
        for name, block in self.blocks.items():
            source = block.task_experts.pretrained()
            if source is None:
                continue
            for key, tensor in (
                ("w_in", source.w_in),
                ("b_in", source.b_in),
                ("w_out", source.w_out),
                ("b_out", source.b_out),
            ):
                if tensor is not None:
                    state[f"{PRETRAINED_FFN_PREFIX}{name}.{key}"] = tensor.detach().contiguous().clone()
        return state

    def export_task(
        self,
        directory: str | os.PathLike[str],
        task: str | int,
        save_backbone: bool | None = None,
        check_inputs: dict[str, torch.Tensor] | None = None,
        tolerance: float = 1e-4,
    ) -> None:
        """Write a single-task model: the task's routes frozen in, experts it never uses dropped.

        Task-level routers become a ``fixed`` router over the experts with non-zero weight; a gate keeps its
        network and the task's selector row; a token router keeps all experts and the task's embedding.
        Loading the export gives outputs equal to this model's on that task (tested); with ``check_inputs``
        (a batch of model inputs) the export is loaded and compared on it, and a mismatch beyond
        ``tolerance`` (max absolute logit difference) raises.
        """
        task_index = self.task_id(task)
        step = self.context.step
        state: dict[str, torch.Tensor] = {}
        router_config = self.router_config
        block_layouts: dict[str, dict[str, Any]] = {}
        for block_name, block in self.blocks.items():
            router = block.router
            banks = [block.task_experts] + ([block.shared_experts] if block.shared_experts is not None else [])
            combined = _concat_banks(banks)
            if isinstance(router, TaskLevelRouter):
                row = router.task_mixture(step)[task_index]
                kept = [int(i) for i in torch.nonzero(row).flatten()]
                router_state = router.export_as_fixed(task_index, kept, step)
                router_config = RouterConfig(kind="fixed", routes={self.task_names[task_index]: [0]})
                layout = ExpertLayout(1, len(kept), 0, [list(range(len(kept)))])
                exported_banks = {"task_experts": combined.selected(kept)}
            elif isinstance(router, (GateRouter, TokenRouter)):
                router_state = router.exported_state(task_index, [])
                router_config = frozen_config(router.config, step)
                layout = ExpertLayout(
                    1,
                    self.layout.num_task_experts,
                    self.layout.num_shared_experts,
                    [self.layout.task_experts[task_index]],
                )
                exported_banks = {"task_experts": block.task_experts}
                if block.shared_experts is not None:
                    exported_banks["shared_experts"] = block.shared_experts
            else:
                raise TypeError(f"cannot export router {type(router).__name__}")
            block_layouts[block_name] = dataclasses.asdict(layout)
            for bank_name, bank in exported_banks.items():
                for key, tensor in bank.state_dict().items():
                    state[f"{block_name}.{bank_name}.{key}"] = tensor.detach().contiguous().clone()
            for key, tensor in router_state.items():
                state[f"{block_name}.router.{key}"] = tensor.detach().contiguous().clone()
        metadata = self._metadata()
        metadata["router"] = dataclasses.asdict(router_config)
        metadata["layout"] = next(iter(block_layouts.values()), dataclasses.asdict(ExpertLayout(1, 1, 0)))
        metadata["block_layouts"] = block_layouts
        metadata["exported_from_task"] = self.task_names[task_index]
        info = self.tasks[task_index]
        tasks = [{"name": info.name, "id": 0, "category": info.category}]
        backbone = self._saved_backbone() if self._backbone_needs_saving(save_backbone) else None
        _write_artifact(Path(directory), metadata, tasks, state, backbone, self.backbone)
        if check_inputs is not None:
            self._check_export(Path(directory), task_index, check_inputs, tolerance)

    @torch.no_grad()
    def _check_export(self, directory: Path, task: int, inputs: dict[str, torch.Tensor], tolerance: float) -> None:
        batch = self._batch_size((), inputs) or 1
        was_training = self.training
        self.eval()
        try:
            expected = self(**inputs, task_ids=[task] * batch).logits
            exported = MTAModel.from_pretrained(directory, map_location=str(expected.device)).to(expected.device).eval()
            got = exported(**inputs, task_ids=[0] * batch).logits
        finally:
            self.train(was_training)
        difference = float((got.float() - expected.float()).abs().max())
        if difference > tolerance:
            raise ValueError(
                f"export of task {self.task_names[task]!r} to {directory} differs from the full model by "
                f"{difference:.3g} (tolerance {tolerance:.3g})"
            )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], backbone: nn.Module | None = None, map_location: str = "cpu"
    ) -> MTAModel:
        """Restore a saved (or exported) model exactly: backbone, experts, routers, task table, step."""
        from alter_ds.config import ModelConfig
        from alter_ds.mta.backbone import backbone_from_config_dir, load_backbone

        root = Path(directory)
        for required in (CONFIG_FILE, TASKS_FILE, WEIGHTS_FILE):
            if not (root / required).is_file():
                raise MissingFileError(f"{root} is not an alter-ds model: {required} is missing")
        metadata = json.loads((root / CONFIG_FILE).read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"{root / CONFIG_FILE}: unsupported format_version {metadata.get('format_version')}")
        tasks_data = json.loads((root / TASKS_FILE).read_text())
        tasks = [TaskConfig(t["name"], t.get("category", "default")) for t in sorted(tasks_data, key=lambda t: t["id"])]
        mta_config = config_from_dict(MTAConfig, metadata["mta"], str(root / CONFIG_FILE))
        router = config_from_dict(RouterConfig, metadata["router"], str(root / CONFIG_FILE))
        layout = ExpertLayout(**metadata["layout"])
        backbone_saved = (root / BACKBONE_DIR / "model.safetensors").is_file()
        if backbone is None:
            if backbone_saved:
                backbone = backbone_from_config_dir(str(root / BACKBONE_DIR))
            elif metadata.get("backbone"):
                backbone = load_backbone(config_from_dict(ModelConfig, metadata["backbone"]))
            else:
                raise MissingFileError(f"{root}: the backbone was neither saved nor referenced; pass backbone=")
        # weights saved with the artefact are the backbone now: the original reference no longer describes it,
        # so a later save (e.g. of a stage that starts here) must write the weights again, not the reference
        reference = None if backbone_saved else metadata.get("backbone")
        model = cls(backbone, mta_config, tasks, router, layout, reference)
        if backbone_saved:
            saved = load_file(str(root / BACKBONE_DIR / "model.safetensors"), device=map_location)
            pretrained = {
                k[len(PRETRAINED_FFN_PREFIX) :]: saved.pop(k)
                for k in list(saved)
                if k.startswith(PRETRAINED_FFN_PREFIX)
            }
            model._restore_pretrained_ffn(pretrained)
            expected = model.backbone_state_dict()
            if set(saved) != set(expected):
                missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
                raise UsageError(
                    f"{root}: backbone weights do not match the model "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            model.backbone.load_state_dict(saved, strict=False)
        weights = load_file(str(root / WEIGHTS_FILE), device=map_location)
        for block_name, block_layout in metadata.get("block_layouts", {}).items():
            model._reshape_block(block_name, ExpertLayout(**block_layout), router, weights)
        model.load_mta_state_dict(weights)
        model.set_step(metadata.get("step", 0))
        return model

    def _restore_pretrained_ffn(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, block in self.blocks.items():
            if f"{name}.w_in" in tensors:
                block.task_experts.remember_pretrained(
                    FeedForwardWeights(
                        tensors[f"{name}.w_in"],
                        tensors.get(f"{name}.b_in"),
                        tensors[f"{name}.w_out"],
                        tensors.get(f"{name}.b_out"),
                        block.task_experts.activation,
                    )
                )

    def _reshape_block(
        self, name: str, layout: ExpertLayout, router: RouterConfig, weights: dict[str, torch.Tensor]
    ) -> None:
        """Give one block the expert counts an export saved for it (they may differ from layer to layer)."""
        block = self.blocks[name]
        block.task_experts = block.task_experts.resized(layout.num_task_experts)
        if layout.num_shared_experts == 0:
            block.shared_experts = None
        elif block.shared_experts is not None:
            block.shared_experts = block.shared_experts.resized(layout.num_shared_experts)
        block.set_router(router, layout)

    def load_mta_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``mta_state_dict`` output strictly: every block must get exactly its tensors."""
        for block_name, block in self.blocks.items():
            prefix = f"{block_name}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            missing, unexpected = block.load_state_dict(own, strict=False)
            if missing or unexpected:
                raise UsageError(f"MTA weights for block {block_name}: missing {missing}, unexpected {unexpected}")
        known = tuple(f"{name}." for name in self.blocks)
        stray = [k for k in state if not k.startswith(known)]
        if stray:
            raise UsageError(f"MTA weights for blocks this model does not have: {stray[:5]}")


def _concat_banks(banks: list[ExpertBank]) -> ExpertBank:
    """One bank holding the experts of ``banks`` in order (task experts, then shared ones), as a copy."""
    if len(banks) == 1:
        return banks[0]
    combined = banks[0].resized(sum(b.num_experts for b in banks))
    with torch.no_grad():
        for target, source in zip(combined.weights(), stacked_weights(banks)):
            if target is not None and source is not None:
                target.copy_(source)
    return combined


def _init_new_experts(block: MTABlock, bank: ExpertBank, new: slice, init: str, source_expert: int | None) -> None:
    """zeros: output starts at exactly zero (up projection zero, down projection random, so it can learn);
    pretrained: a copy of the layer's pretrained FFN (ffn experts); expert: a copy of expert ``source_expert``."""
    if init == "zeros":
        bank.init_bottleneck(new)
    elif init == "pretrained":
        source = block.task_experts.pretrained()
        if source is None:
            raise UsageError("init: pretrained copies the layer's pretrained FFN and needs expert_kind: ffn")
        bank.init_from_feed_forward(source, new)
    elif init == "expert":
        banks = [block.task_experts] + ([block.shared_experts] if block.shared_experts is not None else [])
        combined = _concat_banks(banks)
        if source_expert is None or not 0 <= source_expert < combined.num_experts:
            raise UsageError(f"init: expert needs source_expert in [0, {combined.num_experts}), got {source_expert}")
        with torch.no_grad():
            for target, origin in zip(bank.weights(), combined.weights()):
                if target is not None and origin is not None:
                    target[new].copy_(origin[source_expert])
    else:
        raise UsageError(f"unknown expert init {init!r} (zeros, pretrained, expert)")


def _write_artifact(
    root: Path,
    metadata: dict[str, Any],
    tasks: list[dict[str, Any]],
    mta_state: dict[str, torch.Tensor],
    backbone_state: dict[str, torch.Tensor] | None,
    backbone: nn.Module,
) -> None:
    """Write into a temporary sibling directory and rename it into place: never a half-written model."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        metadata = dict(metadata, backbone_saved=backbone_state is not None)
        (staging / CONFIG_FILE).write_text(json.dumps(metadata, indent=2))
        (staging / TASKS_FILE).write_text(json.dumps(tasks, indent=2))
        save_file(mta_state, str(staging / WEIGHTS_FILE))
        if backbone_state is not None:
            (staging / BACKBONE_DIR).mkdir()
            typing.cast(Any, backbone).config.save_pretrained(str(staging / BACKBONE_DIR))
            save_file(backbone_state, str(staging / BACKBONE_DIR / "model.safetensors"))
        if root.exists():
            retired = root.with_name(f".{root.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            root.rename(retired)
            staging.rename(root)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
