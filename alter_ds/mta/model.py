"""MTAModel: a stock transformers model with MTA blocks, task-aware forward/generate, stages and one artefact.

The wrapper owns the routing context that every block reads: ``forward(..., task_ids, prompt_mask)`` and
``generate(..., task_ids)`` set it, so the backbone's own ``forward`` and ``generate`` run unchanged (greedy,
beam search, KV cache, mixed-task batches). Stages change the model only through ``apply_stage``: add experts,
switch the router, choose what trains (``stages.py``); the artefact it saves and loads is ``artifact.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import inspect
import os
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from alter_ds.config import PARAMETER_GROUPS, ExperimentConfig, MTAConfig, RouterConfig, StageConfig, TaskConfig
from alter_ds.errors import UsageError
from alter_ds.mta import artifact, peft_export, stages
from alter_ds.mta.block import MTABlock, RoutingContext, pool_prompt
from alter_ds.mta.inject import hidden_width, inject_mta
from alter_ds.mta.routers import ExpertLayout

ExportFormat = Literal["alter-ds", "peft", "merged"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = typing.get_args(ExportFormat)


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
        self.task_embeddings: nn.Embedding | None = None
        #: the table was made here, not loaded: a stage may initialise it (embedding_init: inputs)
        self.fresh_task_embeddings = False
        if self.router_config.kind == "task_embedding":
            self.ensure_task_embeddings(self.router_config.task_embedding_dim)
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

    def backbone_accepts(self, argument: str) -> bool:
        """Whether the backbone's forward takes ``argument`` (``logits_to_keep``, ``cache``: each
        architecture's forward has its own set, and they changed names across transformers releases)."""
        accepted = self.__dict__.get("_backbone_arguments")
        if accepted is None:
            accepted = frozenset(inspect.signature(self.backbone.forward).parameters)
            self.__dict__["_backbone_arguments"] = accepted
        return argument in accepted

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

    def ensure_task_embeddings(self, dim: int = 0) -> nn.Embedding:
        """The model's task-embedding table ``[tasks, dim]`` (0: the backbone's width), made N(0, 1) if absent.

        One table for the whole model: every task_embedding router reads it through the routing context.
        """
        width = dim or hidden_width(self.backbone)
        table = self.task_embeddings
        if table is None:
            reference = next(self.backbone.parameters())
            table = nn.Embedding(len(self.tasks), width, device=reference.device, dtype=reference.dtype)
            nn.init.normal_(table.weight)
            self.task_embeddings = table
            self.fresh_task_embeddings = True
        elif table.embedding_dim != width:
            raise UsageError(
                f"router.task_embedding_dim is {width}, but this model's task-embedding table has {table.embedding_dim}"
            )
        self.context.task_embeddings = table
        return table

    @contextlib.contextmanager
    def pretrained_only(self) -> Iterator[None]:
        """Compute the backbone as it was before injection: adapters add nothing, replaced FFNs and layers
        run their pretrained copies. Task vectors from inputs use it, so that a task's vector does not depend
        on what the experts have learned (known tasks at stage 1 and an unseen task later are comparable)."""
        from alter_ds.mta.layer_experts import LayerBank

        self.context.pretrained_only = True
        try:
            yield
        finally:
            self.context.pretrained_only = False
            for block in self.blocks.values():
                if isinstance(block.task_experts, LayerBank):  # kept on the host between uses
                    block.task_experts.pretrained_layer().to("cpu")

    def set_step(self, step: int) -> None:
        """The optimizer step the temperature schedules read."""
        self.context.step = int(step)

    # ---------------------------------------------------------------------------- parameter groups
    def named_parameter_groups(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(group, name, parameter) for every parameter; groups: backbone, task_experts, shared_experts, router,
        task_embeddings."""
        owners: dict[int, str] = {}
        if self.task_embeddings is not None:
            owners[id(self.task_embeddings.weight)] = "task_embeddings"
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

    # ---------------------------------------------------------------------- structure (stages.py)
    def set_router(self, config: RouterConfig) -> None:
        """Give every block a router of this config (learned state carried over where names match)."""
        stages.set_router(self, config)

    def add_shared_experts(self, count: int, init: str = "zeros", source_expert: int | None = None) -> None:
        """Add ``count`` shared experts to every block (init: zeros, pretrained or expert)."""
        stages.add_shared_experts(self, count, init, source_expert)

    def add_task(
        self,
        name: str,
        category: str = "default",
        init: str = "zeros",
        source_expert: int | None = None,
        experts: list[int] | None = None,
    ) -> int:
        """Add a task with its own new task expert in every block (or assigned ``experts``); returns its id."""
        return stages.add_task(self, name, category, init, source_expert, experts)

    def apply_stage(self, stage: StageConfig) -> dict[str, tuple[int, int]]:
        """Make the model what ``stage`` trains: add its experts, set its router, choose its trainable set."""
        return stages.apply_stage(self, stage)

    def task_mixtures(self) -> dict[str, torch.Tensor | None]:
        """Each block's ``[tasks, experts]`` mixture at evaluation (None for input-dependent routers)."""
        return {name: block.router.task_mixture(self.context.step) for name, block in self.blocks.items()}

    # ---------------------------------------------------------------------- artefact (artifact.py)
    def mta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every MTA tensor (experts, routers, their persistent buffers), keyed ``<block>.<name>``."""
        return artifact.mta_state_dict(self)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's own tensors (MTA tensors excluded), keyed as in the injected backbone."""
        return artifact.backbone_state_dict(self)

    def load_mta_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``mta_state_dict`` output strictly: every block must get exactly its tensors."""
        artifact.load_mta_state_dict(self, state)

    def save_pretrained(self, directory: str | os.PathLike[str], save_backbone: bool | None = None) -> None:
        """Write the artefact (``artifact.save_pretrained``); the backbone by value when a stage trained it."""
        artifact.save_pretrained(self, directory, save_backbone)

    def export_task(
        self,
        directory: str | os.PathLike[str],
        task: str | int,
        save_backbone: bool | None = None,
        check_inputs: dict[str, torch.Tensor] | None = None,
        tolerance: float = 1e-4,
        format: ExportFormat = "alter-ds",
    ) -> None:
        """Write one task: an alter-ds model with the task's routes frozen in (``artifact.export_task``), or, for
        lora experts, a PEFT LoRA adapter (``peft``) or a plain Hugging Face model with the update merged into the
        weights (``merged``; ``peft_export.py``)."""
        if format == "alter-ds":
            artifact.export_task(self, directory, task, save_backbone, check_inputs, tolerance)
        elif format == "peft":
            peft_export.export_peft(self, directory, task)
        elif format == "merged":
            peft_export.export_merged(self, directory, task)
        else:
            raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], backbone: nn.Module | None = None, map_location: str = "cpu"
    ) -> MTAModel:
        """Restore a saved (or exported) model exactly: backbone, experts, routers, task table, step."""
        return artifact.load_model(cls, directory, backbone, map_location)
