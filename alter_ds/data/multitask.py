"""All tasks of an experiment as tokenised splits, and this rank's stream of training batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from alter_ds.config import DataConfig, TaskConfig
from alter_ds.data.collate import MultiTaskCollator, TokenizedExample, pack_examples, tokenize_example
from alter_ds.data.sampler import MultiTaskSampler
from alter_ds.data.tasks import Example, check_unique_names, load_split


class TokenizedTask(Sequence[TokenizedExample]):
    """One task's examples, tokenised when first drawn and kept: a run draws steps x batch examples, often a
    small part of a large split (138k translation pairs for a few thousand draws), so tokenising the whole
    split up front cost minutes of start-up on every rank for nothing."""

    def __init__(self, task: TaskConfig, task_id: int, examples: list[Example], tokenizer: Any, seq2seq: bool):
        self.task = task
        self.task_id = task_id
        self.raw = examples
        self.tokenizer = tokenizer
        self.seq2seq = seq2seq
        self.cache: dict[int, TokenizedExample] = {}

    def __len__(self) -> int:
        return len(self.raw)

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...
    @overload
    def __getitem__(self, index: slice) -> list[TokenizedExample]: ...
    def __getitem__(self, index: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index not in self.cache:
            example = self.raw[index]
            self.cache[index] = tokenize_example(
                self.tokenizer, self.task, self.task_id, example.prompt, example.target, self.seq2seq
            )
        return self.cache[index]


@dataclass
class MultiTaskData:
    """One split of every task; ``examples[t]`` holds task t's examples in file order, tokenised on use."""

    tasks: list[TaskConfig]
    split: str
    examples: list[TokenizedTask]
    skipped: dict[str, int]

    @classmethod
    def load(
        cls,
        tasks: Sequence[TaskConfig],
        tokenizer: Any,
        seq2seq: bool,
        split: str,
        root: str | Path = ".",
        seed: int = 0,
    ) -> MultiTaskData:
        check_unique_names(list(tasks))
        examples: list[TokenizedTask] = []
        skipped: dict[str, int] = {}
        for task_id, task in enumerate(tasks):
            data = load_split(task, split, root, seed)
            skipped[task.name] = data.skipped
            examples.append(TokenizedTask(task, task_id, data.examples, tokenizer, seq2seq))
        return cls(list(tasks), split, examples, skipped)

    def sizes(self) -> list[int]:
        return [len(e) for e in self.examples]


class TrainBatches:
    """This rank's batches: a slice of each global batch from the multi-task sampler, collated.

    ``state_dict`` is the sampler's; restoring it replays exactly the batches an uninterrupted run would see,
    on any number of ranks that divides the global batch.
    """

    def __init__(
        self,
        data: MultiTaskData,
        config: DataConfig,
        collator: MultiTaskCollator,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.data = data
        self.config = config
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.sampler = MultiTaskSampler(
            data.sizes(),
            global_batch_size=micro_batch_size * world_size,
            strategy=config.sampling,
            temperature=config.temperature,
            max_per_task=config.max_examples_per_task,
            mixed_batches=config.mixed_batches,
            seed=seed,
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        pairs = MultiTaskSampler.shard(self.sampler.next_global_batch(), self.rank, self.world_size)
        examples = [self.data.examples[task][index] for task, index in pairs]
        if self.config.packing and not self.collator.seq2seq:
            examples = pack_examples(sorted(examples, key=lambda e: e.task_id), self.config.max_length)
        return self.collator(examples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
