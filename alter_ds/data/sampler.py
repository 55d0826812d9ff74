"""Multi-task sampling: which (task, example) pairs make each global batch, deterministically and resumably.

One global stream is drawn for all ranks and each rank takes its slice of every global batch, so the ranks'
shards are disjoint and together complete, and a run resumed on a different number of ranks still sees the
same global batches. Task draws for global example ``i`` come from a generator seeded by ``(seed, i // BLOCK)``
and each task walks a seeded permutation of its examples, one per epoch of that task; the whole state is the
position in the stream plus a cursor per task (small, saved in every checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alter_ds.errors import UsageError

STRATEGIES = ("proportional", "temperature", "uniform")
BLOCK = 4096


def task_probabilities(sizes: Sequence[int], strategy: str, temperature: float = 1.0) -> list[float]:
    """p_t ∝ n_t (proportional), ∝ n_t^(1/τ) (temperature), or 1/T (uniform)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; one of {STRATEGIES}")
    if not sizes or any(n <= 0 for n in sizes):
        raise UsageError(f"every task needs at least one example, got sizes {list(sizes)}")
    if strategy == "uniform":
        weights = [1.0] * len(sizes)
    elif strategy == "proportional":
        weights = [float(n) for n in sizes]
    else:
        weights = [float(n) ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


def _seeded(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**62)
    return torch.Generator().manual_seed(value)


class MultiTaskSampler:
    """An endless, seeded stream of global batches of ``(task, example index)`` pairs."""

    def __init__(
        self,
        sizes: Sequence[int],
        global_batch_size: int,
        strategy: str = "proportional",
        temperature: float = 2.0,
        max_per_task: int | None = None,
        mixed_batches: bool = True,
        seed: int = 0,
    ):
        if global_batch_size < 1:
            raise UsageError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.sizes = [min(n, max_per_task) if max_per_task else n for n in sizes]
        self.full_sizes = list(sizes)
        self.probabilities = task_probabilities(self.sizes, strategy, temperature)
        self.global_batch_size = global_batch_size
        self.mixed_batches = mixed_batches
        self.seed = seed
        self.position = 0  # examples (mixed) or batches (single-task) drawn so far
        self.cursors = [0] * len(sizes)
        self._weights = torch.tensor(self.probabilities, dtype=torch.float64)
        self._block: tuple[int, list[int]] | None = None
        self._pools = [self._pool(t) for t in range(len(sizes))]
        self._orders: dict[int, tuple[int, list[int]]] = {}

    def _pool(self, task: int) -> list[int]:
        """The examples a capped task draws from: a fixed seeded subset of its full set."""
        if self.sizes[task] == self.full_sizes[task]:
            return list(range(self.sizes[task]))
        order = torch.randperm(self.full_sizes[task], generator=_seeded(self.seed, 7, task)).tolist()
        return sorted(order[: self.sizes[task]])

    def _task_draw(self, index: int) -> int:
        block, offset = divmod(index, BLOCK)
        if self._block is None or self._block[0] != block:
            draws = torch.multinomial(self._weights, BLOCK, replacement=True, generator=_seeded(self.seed, 1, block))
            self._block = (block, draws.tolist())
        return self._block[1][offset]

    def _example(self, task: int) -> int:
        cursor = self.cursors[task]
        epoch, offset = divmod(cursor, self.sizes[task])
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            order = torch.randperm(self.sizes[task], generator=_seeded(self.seed, 2, task, epoch)).tolist()
            cached = (epoch, order)
            self._orders[task] = cached
        self.cursors[task] = cursor + 1
        return self._pools[task][cached[1][offset]]

    def next_global_batch(self) -> list[tuple[int, int]]:
        """The next global batch; rank r of W trains on ``batch[r * B : (r + 1) * B]``."""
        batch = []
        if self.mixed_batches:
            for _ in range(self.global_batch_size):
                task = self._task_draw(self.position)
                self.position += 1
                batch.append((task, self._example(task)))
        else:
            task = self._task_draw(self.position)
            self.position += 1
            batch = [(task, self._example(task)) for _ in range(self.global_batch_size)]
        return batch

    @staticmethod
    def shard(batch: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
        """This rank's contiguous slice of a global batch (the global batch size is a multiple of world_size)."""
        if len(batch) % world_size:
            raise UsageError(f"a global batch of {len(batch)} does not split over {world_size} ranks")
        per_rank = len(batch) // world_size
        return batch[rank * per_rank : (rank + 1) * per_rank]

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "cursors": list(self.cursors),
            "sizes": list(self.sizes),
            "probabilities": list(self.probabilities),
            "seed": self.seed,
            "mixed_batches": self.mixed_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved sampler stopped; refuses a state from a different task mix."""
        for key in ("sizes", "seed", "mixed_batches"):
            if state[key] != getattr(self, key):
                raise UsageError(f"sampler state is from another run: {key} {state[key]} != {getattr(self, key)}")
        if any(abs(a - b) > 1e-12 for a, b in zip(state["probabilities"], self.probabilities)):
            raise UsageError("sampler state is from another run: task probabilities differ")
        self.position = int(state["position"])
        self.cursors = [int(c) for c in state["cursors"]]
