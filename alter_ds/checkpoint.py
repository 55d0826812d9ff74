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


def save_checkpoint(engine: Any, directory: Path, tag: str, client_state: dict[str, Any], keep: int) -> None:
    """Write checkpoint ``tag`` on every rank, then (rank 0) point ``latest`` at it and prune old ones.

    Only trainable parameters are written (``exclude_frozen_parameters``): a frozen-backbone checkpoint is the
    size of the adapters and routers, not of the model.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
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


def load_checkpoint(engine: Any, directory: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """Resume from ``latest`` in ``directory``: engine state, this rank's RNG; returns the client state."""
    import torch.distributed as dist

    tag = latest_tag(directory)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(
        str(directory), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise CheckpointError(f"{directory / tag}: DeepSpeed could not load this checkpoint")
    if client_state.get("fingerprint") != expected_fingerprint:
        raise CheckpointError(
            f"{directory / tag} was written by another model, task list or stage config "
            f"(fingerprint {client_state.get('fingerprint')} != {expected_fingerprint}); "
            f"use a new run_name or --resume none"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return dict(client_state)
