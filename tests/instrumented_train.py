"""``alter_ds/train.py`` with instruments for tests, started by the real launcher in its place.

Environment variables choose them:

- ``POISON_MICRO_BATCH=N``: on rank 0 only, the loss of the N-th micro-batch drawn (0-based) is made NaN, so
  its gradients are not finite;
- ``DROP_MICRO_BATCHES=N,M``: every rank draws micro-batches N..M and throws them away (the run without them);
- ``RECORD_COLLECTIVES=DIR``: every tensor handed to ``torch.distributed`` has its device recorded, with the
  calling file, and each rank writes ``DIR/rank<r>-<pid>.json`` with the devices seen and its compute device.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all_single",
)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def record_collectives(directory: Path) -> None:
    seen: collections.Counter[str] = collections.Counter()

    def wrap(name: str, function: Any) -> Any:
        @functools.wraps(function)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            caller = Path(sys._getframe(1).f_code.co_filename)
            where = "alter_ds" if REPO / "alter_ds" in caller.parents else "library"
            for tensor in _tensors(list(args) + list(kwargs.values())):
                seen[f"{where} {name} {tensor.device}"] += 1
            return function(*args, **kwargs)

        return recorded

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))

    def write() -> None:
        from deepspeed.accelerator import get_accelerator

        rank = dist.get_rank() if dist.is_initialized() else 0
        directory.mkdir(parents=True, exist_ok=True)
        record = {"device": str(torch.device(get_accelerator().current_device_name())), "calls": dict(seen)}
        (directory / f"rank{rank}-{os.getpid()}.json").write_text(json.dumps(record, indent=2))  # one per run

    atexit.register(write)


def poison(micro_batch: int) -> None:
    from alter_ds import train

    original = train.micro_batch_loss
    drawn = 0

    def poisoned(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal drawn
        loss, sums = original(*args, **kwargs)
        if drawn == micro_batch and dist.get_rank() == 0:
            loss = loss * float("nan")
        drawn += 1
        return loss, sums

    train.micro_batch_loss = poisoned


def drop(first: int, last: int) -> None:
    from alter_ds.data.multitask import TrainBatches

    original = TrainBatches.next_batch
    drawn = 0

    def next_batch(self: TrainBatches) -> dict[str, torch.Tensor]:
        nonlocal drawn
        while first <= drawn <= last:
            original(self)
            drawn += 1
        drawn += 1
        return original(self)

    TrainBatches.next_batch = next_batch  # type: ignore[method-assign]


def main() -> int:
    if "RECORD_COLLECTIVES" in os.environ:
        record_collectives(Path(os.environ["RECORD_COLLECTIVES"]))
    if "POISON_MICRO_BATCH" in os.environ:
        poison(int(os.environ["POISON_MICRO_BATCH"]))
    if "DROP_MICRO_BATCHES" in os.environ:
        first, last = (int(n) for n in os.environ["DROP_MICRO_BATCHES"].split(","))
        drop(first, last)
    from alter_ds import train

    return train.run()


if __name__ == "__main__":
    raise SystemExit(main())
