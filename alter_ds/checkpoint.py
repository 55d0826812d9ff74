"""Checkpoints that never lose work: DeepSpeed checkpoints of the trainable state, a ``latest`` pointer moved
atomically only once every rank has finished writing, per-rank RNG states, and a stop request raised by
SIGTERM/SIGUSR1 (what Slurm sends before preemption) that the loop honours at the next step boundary."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete or from another model/config."""


class StopRequest:
    """Set by SIGTERM or SIGUSR1; the training loop checkpoints and exits 0 at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(number).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def fingerprint(data: Any) -> str:
    """A short stable hash of what a checkpoint must match (model, tasks, MTA layout, the stage)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def latest_tag(directory: Path) -> str | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (directory / tag).is_dir():
        raise CheckpointError(f"{pointer} names {tag!r}, which does not exist")
    return tag


def write_latest(directory: Path, tag: str) -> None:
    temporary = directory / f".{LATEST}.tmp"
    temporary.write_text(tag + "\n")
    os.replace(temporary, directory / LATEST)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


ADAM_STATES = ("exp_avg", "exp_avg_sq")


def whole_trainable_state(directory: Path, tag: str) -> dict[str, Any]:
    """The trainable parameters' fp32 values and Adam moments, whole, merged from every rank's ZeRO file.

    Each ``zero_pp_rank_*`` file holds that rank's flat fp32 partition of every parameter group, the Adam
    moments aligned with it, and ``param_slice_mappings`` (where each parameter's fragment lies in it); a
    parameter is its fragments in rank order. The trainable state is small (adapters, routers), so this is
    cheap, and it is what a run resuming on another number of ranks re-partitions.
    """
    files = sorted((directory / tag).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not files:
        raise CheckpointError(f"{directory / tag} has no ZeRO optimizer files")
    fragments: dict[str, dict[str, list[torch.Tensor]]] = {}
    step = 0
    for path in files:
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        partitions = saved["single_partition_of_fp32_groups"]
        moments = saved["base_optimizer_state"]["state"]
        for group, mapping in enumerate(saved["param_slice_mappings"]):
            group_state = moments.get(group, {})
            step = max(step, int(group_state.get("step", 0)))
            for name, address in mapping.items():
                window = slice(address.start, address.start + address.numel)
                entry = fragments.setdefault(name, {"fp32": []})
                entry["fp32"].append(partitions[group][window])
                for key in ADAM_STATES:
                    if key in group_state:
                        entry.setdefault(key, []).append(group_state[key][window])
    params = {name: {key: torch.cat(parts) for key, parts in entry.items()} for name, entry in fragments.items()}
    return {"params": params, "optimizer_step": step}


def _rank_of(path: Path) -> int:
    return int(path.name.split("_")[3])  # zero_pp_rank_<r>_mp_rank_00_optim_states.pt


def apply_trainable_state(engine: Any, state: dict[str, Any]) -> None:
    """Put a ``whole_trainable_state`` into an engine of any world size (every rank calls this)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_adam_state(engine, int(state["optimizer_step"]))
    saved = state["params"]
    for name, parameter in engine.module.named_parameters():
        if not parameter.requires_grad:
            continue
        if name not in saved:
            raise CheckpointError(f"the checkpoint has no state for trainable parameter {name}")
        entry = {key: value.view(parameter.shape) for key, value in saved[name].items()}
        with torch.no_grad():
            parameter.copy_(entry["fp32"].to(parameter.dtype))
        safe_set_full_fp32_param(parameter, entry["fp32"].to(parameter.device))
        for key in ADAM_STATES:
            if key in entry:
                safe_set_full_optimizer_state(parameter, entry[key].to(parameter.device), key)


def _create_adam_state(engine: Any, step: int) -> None:
    """A fresh engine's Adam has no state until its first step, and DeepSpeed links each parameter's view of
    the partitioned state only then; create the state (zeros, the saved step count) and link it now."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in base.param_groups:
        for flat in group["params"]:
            values = base.state[flat]
            values["step"] = torch.tensor(float(step))
            for key in ADAM_STATES:
                values.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


@dataclass(frozen=True)
class SavedCheckpoint:
    """What a run must know of its latest checkpoint before building its engine."""

    tag: str
    world_size: int  # data-parallel ranks that wrote it
    fingerprint: str | None


def latest_checkpoint(directory: Path) -> SavedCheckpoint | None:
    """The latest checkpoint in ``directory`` (None if there is none), read once from its model-states file."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    states = directory / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"{directory / tag} is incomplete: {states.name} is missing")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    return SavedCheckpoint(tag, int(saved["dp_world_size"]), saved.get("fingerprint"))


def _exclude_tied_frozen_weights(engine: Any) -> None:
    """Make ``exclude_frozen_parameters`` also drop frozen *tied* weights.

    DeepSpeed deletes frozen parameters by the names ``named_parameters()`` yields, which lists a tied weight
    once; its alias (``lm_head.weight`` tied to the embeddings) stays in the state dict, and a router-only
    checkpoint of SmolLM2-135M then carries a 113 MB embedding. Loading is non-strict, and the alias is
    restored by the tie itself.
    """
    if getattr(engine, "_alter_ds_excludes_tied", False):
        return
    original = engine.module_state_dict
    frozen = {id(p) for _, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def module_state_dict(*args: Any, exclude_frozen_parameters: bool = False, **kwargs: Any) -> Any:
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            tensors = engine.module.state_dict(keep_vars=True)
            for name in [n for n in state if n in tensors and id(tensors[n]) in frozen]:
                del state[name]
        return state

    engine.module_state_dict = module_state_dict
    engine._alter_ds_excludes_tied = True


def save_checkpoint(engine: Any, directory: Path, tag: str, client_state: dict[str, Any], keep: int) -> None:
    """Write checkpoint ``tag`` on every rank, then (rank 0) point ``latest`` at it and prune old ones.

    Only trainable parameters are written (``exclude_frozen_parameters``): a frozen-backbone checkpoint is the
    size of the adapters and routers, not of the model.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    _exclude_tied_frozen_weights(engine)
    engine.save_checkpoint(
        str(directory), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(rng_state(), directory / tag / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_latest(directory, tag)
        tags = sorted(
            (p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step")),
            key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1,
        )
        for old in tags[:-keep]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(engine: Any, directory: Path, saved: SavedCheckpoint, expected_fingerprint: str) -> dict[str, Any]:
    """Resume from ``saved`` (``latest_checkpoint(directory)``): engine state, this rank's RNG; returns the
    client state.

    On the world size that wrote it, DeepSpeed restores its own partitions exactly; on another one the module
    and schedule come from DeepSpeed's files and the fp32 weights and Adam moments are merged from every saved
    rank's partition and re-partitioned over the new ranks.
    """
    import torch.distributed as dist

    tag = saved.tag
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved.fingerprint != expected_fingerprint:  # before DeepSpeed tries to load mismatched shapes
        raise CheckpointError(
            f"{directory / tag} was written by another model, task list or stage config "
            f"(fingerprint {saved.fingerprint} != {expected_fingerprint}); "
            f"use a new run_name or --resume none"
        )
    same_world = saved.world_size == world
    _, client_state = engine.load_checkpoint(
        str(directory),
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=same_world,
        load_lr_scheduler_states=True,
    )
    if client_state is None:
        raise CheckpointError(f"{directory / tag}: DeepSpeed could not load this checkpoint")
    if not same_world:
        apply_trainable_state(engine, whole_trainable_state(directory, tag))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return dict(client_state)
