"""An MTA model's artefact: the directory ``save_pretrained`` writes and ``from_pretrained`` reads, and the
single-task export.

A directory holds ``mta_config.json`` (format version, MTA and router configs, expert layout, step, and the
backbone by reference), ``tasks.json``, ``mta.safetensors`` (experts and routers) and, when a stage trained the
backbone or it has no loadable reference, ``backbone/`` (its config and weights). It is written into a
temporary sibling and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig, config_from_dict
from alter_ds.errors import MissingFileError, UsageError
from alter_ds.mta.experts import FeedForwardWeights, concat_banks
from alter_ds.mta.layer_experts import LayerBank
from alter_ds.mta.routers import ExpertLayout, GateRouter, TaskLevelRouter, TokenRouter, frozen_config

if TYPE_CHECKING:
    from alter_ds.mta.model import MTAModel

M = TypeVar("M", bound="MTAModel")

FORMAT_VERSION = 1
CONFIG_FILE = "mta_config.json"
TASKS_FILE = "tasks.json"
WEIGHTS_FILE = "mta.safetensors"
BACKBONE_DIR = "backbone"
#: saved with a backbone: the FFN each ffn bank was copied from (replace_ffn removes it from the backbone)
PRETRAINED_FFN_PREFIX = "mta_pretrained_ffn."
#: saved with a backbone: the layer each layer bank was copied from (replace_layer removes it)
PRETRAINED_LAYER_PREFIX = "mta_pretrained_layer."


#: the key of the model's task-embedding table among the MTA tensors
TASK_EMBEDDINGS_KEY = "task_embeddings.weight"


def mta_state_dict(model: MTAModel) -> dict[str, torch.Tensor]:
    """Every MTA tensor (experts, routers, their persistent buffers), keyed ``<block>.<name>``, and the
    task-embedding table when the model has one."""
    state: dict[str, torch.Tensor] = {}
    if model.task_embeddings is not None:
        state[TASK_EMBEDDINGS_KEY] = model.task_embeddings.weight.detach().contiguous().clone()
    for block_name, block in model.blocks.items():
        for key, tensor in block.state_dict().items():
            state[f"{block_name}.{key}"] = tensor.detach().contiguous().clone()
    return state


def backbone_state_dict(model: MTAModel) -> dict[str, torch.Tensor]:
    """The backbone's own tensors (MTA tensors excluded), keyed as in the injected backbone."""
    mta_ids = {id(t) for block in model.blocks.values() for t in block.state_dict(keep_vars=True).values()}
    return {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.backbone.state_dict(keep_vars=True).items()
        if id(tensor) not in mta_ids
    }


def _metadata(model: MTAModel) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "architecture": type(model.backbone).__name__,
        "backbone": model.backbone_reference,
        "mta": dataclasses.asdict(model.mta_config),
        "router": dataclasses.asdict(model.router_config),
        "layout": dataclasses.asdict(model.layout),
        "step": model.context.step,
    }


def _backbone_needs_saving(model: MTAModel, save_backbone: bool | None) -> bool:
    if save_backbone is not None:
        return save_backbone
    trained = any(p.requires_grad for g, _, p in model.named_parameter_groups() if g == "backbone")
    return trained or not model.backbone_reference


def save_pretrained(model: MTAModel, directory: str | os.PathLike[str], save_backbone: bool | None = None) -> None:
    """Write the artefact: config, task table, MTA weights, and the backbone by reference or by value.

    The backbone's weights are written when a stage trained them or when it has no loadable reference
    (e.g. a model built from a config); ``save_backbone`` forces either way.
    """
    tasks = [{"name": t.name, "id": i, "category": t.category} for i, t in enumerate(model.tasks)]
    backbone = _saved_backbone(model) if _backbone_needs_saving(model, save_backbone) else None
    write_artifact(Path(directory), _metadata(model), tasks, mta_state_dict(model), backbone, model.backbone)


def _saved_backbone(model: MTAModel) -> dict[str, torch.Tensor]:
    """The backbone's tensors plus the pretrained FFNs the ffn banks were copied from: ``replace_ffn``
    removed those from the backbone, and experts added later with ``init: pretrained`` need them."""
    state = model.backbone_state_dict()
    for name, block in model.blocks.items():
        if isinstance(block.task_experts, LayerBank):
            for key, tensor in block.task_experts.pretrained_layer().state_dict().items():
                state[f"{PRETRAINED_LAYER_PREFIX}{name}.{key}"] = tensor.detach().contiguous().clone()
            continue
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
    model: MTAModel,
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
    task_index = model.task_id(task)
    step = model.context.step
    state: dict[str, torch.Tensor] = {}
    router_config = model.router_config
    block_layouts: dict[str, dict[str, Any]] = {}
    for block_name, block in model.blocks.items():
        router = block.router
        banks = [block.task_experts] + ([block.shared_experts] if block.shared_experts is not None else [])
        combined = concat_banks(banks)
        if isinstance(router, TaskLevelRouter):
            row = router.task_mixture(step)[task_index]
            kept = [int(i) for i in torch.nonzero(row).flatten()]
            router_state = router.export_as_fixed(task_index, kept, step)
            router_config = RouterConfig(kind="fixed", routes={model.task_names[task_index]: [0]})
            layout = ExpertLayout(1, len(kept), 0, [list(range(len(kept)))])
            exported_banks = {"task_experts": combined.selected(kept)}
        elif isinstance(router, (GateRouter, TokenRouter)):
            router_state = router.exported_state(task_index, [])
            router_config = frozen_config(router.config, step)
            layout = ExpertLayout(
                1,
                model.layout.num_task_experts,
                model.layout.num_shared_experts,
                [model.layout.task_experts[task_index]],
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
    metadata = _metadata(model)
    metadata["router"] = dataclasses.asdict(router_config)
    metadata["layout"] = next(iter(block_layouts.values()), dataclasses.asdict(ExpertLayout(1, 1, 0)))
    metadata["block_layouts"] = block_layouts
    metadata["exported_from_task"] = model.task_names[task_index]
    info = model.tasks[task_index]
    tasks = [{"name": info.name, "id": 0, "category": info.category}]
    backbone = _saved_backbone(model) if _backbone_needs_saving(model, save_backbone) else None
    write_artifact(Path(directory), metadata, tasks, state, backbone, model.backbone)
    if check_inputs is not None:
        _check_export(model, Path(directory), task_index, check_inputs, tolerance)


@torch.no_grad()
def _check_export(
    model: MTAModel, directory: Path, task: int, inputs: dict[str, torch.Tensor], tolerance: float
) -> None:
    batch = model._batch_size((), inputs) or 1
    was_training = model.training
    model.eval()
    try:
        expected = model(**inputs, task_ids=[task] * batch).logits
        exported = type(model).from_pretrained(directory, map_location=str(expected.device)).to(expected.device).eval()
        got = exported(**inputs, task_ids=[0] * batch).logits
    finally:
        model.train(was_training)
    difference = float((got.float() - expected.float()).abs().max())
    if difference > tolerance:
        raise ValueError(
            f"export of task {model.task_names[task]!r} to {directory} differs from the full model by "
            f"{difference:.3g} (tolerance {tolerance:.3g})"
        )


def load_model(
    cls: type[M], directory: str | os.PathLike[str], backbone: nn.Module | None = None, map_location: str = "cpu"
) -> M:
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
            k[len(PRETRAINED_FFN_PREFIX) :]: saved.pop(k) for k in list(saved) if k.startswith(PRETRAINED_FFN_PREFIX)
        }
        _restore_pretrained_ffn(model, pretrained)
        layers = {
            k[len(PRETRAINED_LAYER_PREFIX) :]: saved.pop(k)
            for k in list(saved)
            if k.startswith(PRETRAINED_LAYER_PREFIX)
        }
        _restore_pretrained_layers(model, layers)
        expected = backbone_state_dict(model)
        if set(saved) != set(expected):
            missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise UsageError(
                f"{root}: backbone weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        model.backbone.load_state_dict(saved, strict=False)
    weights = load_file(str(root / WEIGHTS_FILE), device=map_location)
    for block_name, block_layout in metadata.get("block_layouts", {}).items():
        _reshape_block(model, block_name, ExpertLayout(**block_layout), router, weights)
    load_mta_state_dict(model, weights)
    model.set_step(metadata.get("step", 0))
    return model


def _restore_pretrained_ffn(model: MTAModel, tensors: dict[str, torch.Tensor]) -> None:
    for name, block in model.blocks.items():
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


def _restore_pretrained_layers(model: MTAModel, tensors: dict[str, torch.Tensor]) -> None:
    """A saved backbone's layer banks get back the pretrained layer they were copied from (the backbone built
    from its config holds a random one there)."""
    for name, block in model.blocks.items():
        if isinstance(block.task_experts, LayerBank):
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not own:
                raise UsageError(f"the saved backbone lacks the pretrained layer of layer-expert block {name}")
            block.task_experts.pretrained_layer().load_state_dict(own)


def _reshape_block(
    model: MTAModel, name: str, layout: ExpertLayout, router: RouterConfig, weights: dict[str, torch.Tensor]
) -> None:
    """Give one block the expert counts an export saved for it (they may differ from layer to layer)."""
    block = model.blocks[name]
    block.task_experts = block.task_experts.resized(layout.num_task_experts)
    if layout.num_shared_experts == 0:
        block.shared_experts = None
    elif block.shared_experts is not None:
        block.shared_experts = block.shared_experts.resized(layout.num_shared_experts)
    block.set_router(router, layout)


def load_mta_state_dict(model: MTAModel, state: dict[str, torch.Tensor]) -> None:
    """Load ``mta_state_dict`` output strictly: every block must get exactly its tensors."""
    table = state.get(TASK_EMBEDDINGS_KEY)
    if table is not None:
        if model.task_embeddings is not None and model.task_embeddings.weight.shape != table.shape:
            raise UsageError(
                f"task-embedding table of shape {tuple(table.shape)} for a model whose table is "
                f"{tuple(model.task_embeddings.weight.shape)}"
            )
        if table.shape[0] != len(model.tasks):
            raise UsageError(f"task-embedding table has {table.shape[0]} rows for {len(model.tasks)} tasks")
        model.ensure_task_embeddings(table.shape[1])
        with torch.no_grad():
            typing.cast(nn.Embedding, model.task_embeddings).weight.copy_(table)
        model.fresh_task_embeddings = False
    elif model.task_embeddings is not None:
        raise UsageError(f"MTA weights lack {TASK_EMBEDDINGS_KEY}, which this model's task_embedding routers read")
    for block_name, block in model.blocks.items():
        prefix = f"{block_name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = block.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise UsageError(f"MTA weights for block {block_name}: missing {missing}, unexpected {unexpected}")
    known = tuple(f"{name}." for name in model.blocks)
    stray = [k for k in state if not k.startswith(known) and k != TASK_EMBEDDINGS_KEY]
    if stray:
        raise UsageError(f"MTA weights for blocks this model does not have: {stray[:5]}")


def write_artifact(
    root: Path,
    metadata: dict[str, Any],
    tasks: list[dict[str, Any]],
    mta_state: dict[str, torch.Tensor],
    backbone_state: dict[str, torch.Tensor] | None,
    backbone: nn.Module,
) -> None:
    """Write the artefact's files (``write_directory``: never a half-written model)."""

    def write(staging: Path) -> None:
        (staging / CONFIG_FILE).write_text(
            json.dumps(dict(metadata, backbone_saved=backbone_state is not None), indent=2)
        )
        (staging / TASKS_FILE).write_text(json.dumps(tasks, indent=2))
        save_file(mta_state, str(staging / WEIGHTS_FILE))
        if backbone_state is not None:
            (staging / BACKBONE_DIR).mkdir()
            typing.cast(Any, backbone).config.save_pretrained(str(staging / BACKBONE_DIR))
            save_file(backbone_state, str(staging / BACKBONE_DIR / "model.safetensors"))

    write_directory(root, write)


def write_directory(root: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary sibling directory, then rename it into place (replacing ``root``); a
    failure removes the sibling and leaves ``root`` as it was."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(staging)
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
