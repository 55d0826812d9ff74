"""Checkpoints that never lose work: DeepSpeed checkpoints of the trainable state, a ``latest`` pointer moved
atomically only once every rank has finished writing, per-rank RNG states, and a stop request raised by
SIGTERM/SIGUSR1 (what Slurm sends before preemption) that the loop honours at the next step boundary."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from alter_ds.errors import AlterDsError

LATEST = "latest"
#: checkpoint directory names: step<N>, or step<N>.rewrite while a checkpoint of the same step is replaced
TAG = re.compile(r"step(\d+)(\.rewrite)?")
MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(AlterDsError, RuntimeError):
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
    """The tag ``latest`` names (None without a pointer); a pointer that cannot be read raises, naming it."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{pointer} cannot be read ({error})") from None
    if not TAG.fullmatch(tag):
        raise CheckpointError(f"{pointer} does not hold a checkpoint name (it holds {tag[:40]!r})")
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


def _restore_scheduled_lr(engine: Any) -> None:
    """Give the optimizer the learning rate the restored schedule is at.

    DeepSpeed restores the schedule's step, but the optimizer's ``lr`` comes from the optimizer state, which a
    run on another number of ranks does not load: left alone, the first resumed step would use the rate the
    optimizer was built with (the warmup's first value).
    """
    if engine.lr_scheduler is None:
        return
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


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


def optimizer_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, on every rank (a collective)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def warn(message: str) -> None:
    """One warning for the whole run: rank 0 prints it."""
    if _rank_and_world()[0] == 0:
        print(f"alter-ds train: warning: {message}", file=sys.stderr, flush=True)


def _step_of(tag: str) -> int:
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else -1


def _candidates(directory: Path) -> list[str]:
    """Checkpoints to try, newest first: the one ``latest`` names, then the older ones beside it (a directory
    newer than ``latest`` is a save that did not finish). A damaged pointer is named, and every checkpoint
    directory is a candidate."""
    tags = sorted(
        (p.name for p in directory.iterdir() if p.is_dir() and TAG.fullmatch(p.name)) if directory.is_dir() else [],
        key=lambda tag: (_step_of(tag), tag.endswith(".rewrite")),
        reverse=True,
    )
    try:
        latest = latest_tag(directory)
    except CheckpointError as error:
        warn(f"{error}; trying the checkpoints in {directory}, newest first")
        return tags
    if latest is None:
        return []
    return [latest, *(t for t in tags if t != latest and _step_of(t) <= _step_of(latest))]


def _damage(path: Path) -> str | None:
    """Why a ``torch.save`` file cannot be loaded (missing, truncated, a checksum that fails), or None."""
    if not path.is_file():
        return f"{path} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{path} is damaged ({error})"
    return f"{path} is damaged (checksum of {bad} fails)" if bad else None


def _inspect(directory: Path, tag: str, rank: int, world: int) -> tuple[str | None, SavedCheckpoint | None]:
    """Check the files of ``tag`` that this rank will read: the model states (everyone), and this rank's ZeRO
    partition, or every partition when the world size changed (they are merged)."""
    states = directory / tag / MODEL_STATES
    problem = _damage(states)
    if problem:
        return problem, None
    try:
        saved = torch.load(states, map_location="cpu", weights_only=False)
        found = SavedCheckpoint(tag, int(saved["dp_world_size"]), saved.get("fingerprint"))
    except (RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as error:
        return f"{states} cannot be loaded ({type(error).__name__}: {error})", None
    needed = [rank] if found.world_size == world else list(range(found.world_size))
    for partition in needed:
        problem = _damage(directory / tag / optimizer_file(partition))
        if problem:
            return problem, None
    return None, found


def find_checkpoint(directory: Path) -> SavedCheckpoint | None:
    """The newest checkpoint in ``directory`` that every rank can read (a collective; None if there is none).

    A damaged one (a file missing, truncated or failing its checksum, on any rank) is skipped with one warning
    naming the file, and the previous one is tried; when none is left every rank raises the same error.
    """
    rank, world = _rank_and_world()
    candidates = _candidates(directory)
    damaged: list[str] = []
    for index, tag in enumerate(candidates):
        problem, found = _inspect(directory, tag, rank, world)
        problems = sorted({p for p in _gather(problem) if p})
        if not problems:
            rng_problem = _damage(directory / tag / f"rng_rank{rank}.pt")
            if rng_problem:  # this rank's own warning: only its random state is lost
                print(
                    f"alter-ds train: warning: {rng_problem}: rank {rank} resumes with fresh random state "
                    f"(dropout and router noise; the data order is kept)",
                    file=sys.stderr,
                    flush=True,
                )
            return found
        damaged.extend(problems)
        fallback = f"falling back to {candidates[index + 1]}" if index + 1 < len(candidates) else "none older"
        warn(f"checkpoint {tag} cannot be used: {'; '.join(problems)}; {fallback}")
    if damaged:
        raise CheckpointError(
            f"no usable checkpoint in {directory}: {'; '.join(damaged)}. Restore the files, or start the stage "
            f"over with --resume none (or delete {directory})"
        )
    return None


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
    size of the adapters and routers, not of the model. A directory of the same step (a run resumed after its
    last checkpoint saves that step again) is never rewritten in place: the new one is written beside it as
    ``<tag>.rewrite``, ``latest`` moves to it, and only then does it replace the old one.
    """
    import torch.distributed as dist

    rank, _ = _rank_and_world()
    staged = f"{tag}.rewrite" if (directory / tag).exists() else tag
    if rank == 0 and staged != tag and (directory / staged).exists() and latest_tag_or_none(directory) != staged:
        shutil.rmtree(directory / staged)  # the remains of a rewrite that was interrupted
    if dist.is_initialized():
        dist.barrier()
    _exclude_tied_frozen_weights(engine)
    engine.save_checkpoint(
        str(directory), tag=staged, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(rng_state(), directory / staged / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_latest(directory, staged)
        if staged != tag:
            shutil.rmtree(directory / tag)
            os.replace(directory / staged, directory / tag)
            write_latest(directory, tag)
        tags = sorted(
            (p for p in directory.iterdir() if p.is_dir() and TAG.fullmatch(p.name)), key=lambda p: _step_of(p.name)
        )
        for old in tags[:-keep]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def latest_tag_or_none(directory: Path) -> str | None:
    """``latest_tag``, with None for a pointer that cannot be used."""
    try:
        return latest_tag(directory)
    except CheckpointError:
        return None


def load_checkpoint(engine: Any, directory: Path, saved: SavedCheckpoint, expected_fingerprint: str) -> dict[str, Any]:
    """Resume from ``saved`` (``find_checkpoint(directory)``): engine state, this rank's RNG; returns the
    client state.

    On the world size that wrote it, DeepSpeed restores its own partitions exactly; on another one the module
    and schedule come from DeepSpeed's files and the fp32 weights and Adam moments are merged from every saved
    rank's partition and re-partitioned over the new ranks. Every rank learns whether every rank loaded, and
    all raise the same error if one did not.
    """
    tag = saved.tag
    rank, world = _rank_and_world()
    if saved.fingerprint != expected_fingerprint:  # before DeepSpeed tries to load mismatched shapes
        raise CheckpointError(
            f"{directory / tag} was written by another model, task list or stage config "
            f"(fingerprint {saved.fingerprint} != {expected_fingerprint}); "
            f"use a new run_name or --resume none"
        )
    same_world = saved.world_size == world
    problem = None
    client_state: Any = None
    try:
        _, client_state = engine.load_checkpoint(
            str(directory),
            tag=tag,
            load_module_strict=False,
            load_optimizer_states=same_world,
            load_lr_scheduler_states=True,
        )
        if client_state is None:
            problem = "DeepSpeed could not load it"
        elif not same_world:
            apply_trainable_state(engine, whole_trainable_state(directory, tag))
            _restore_scheduled_lr(engine)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as error:
        problem = f"rank {rank}: {type(error).__name__}: {error}"
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise CheckpointError(f"{directory / tag} could not be loaded ({'; '.join(problems)}); use --resume none")
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if _damage(rng_file) is None:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return dict(client_state)
