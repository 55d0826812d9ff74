"""Tokenisation for decoder-only and seq2seq models, padding into batches with ``task_ids`` per example.

Decoder-only: ``prompt + target_prefix + target + eos``; labels are -100 on the prompt so the loss covers the
target only, and ``prompt_mask`` marks the prompt tokens (gates pool over them, as in ``generate``).
Seq2seq: the prompt is the encoder input, the target (+ eos) the labels.
Truncation is per task: the prompt to ``max_input_tokens`` (from the left by default, keeping the question at
its end), the target to ``max_target_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alter_ds.config import TaskConfig

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    task_id: int
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # decoder-only: tokens of the prompt at the start of input_ids


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, seq2seq: bool, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy ``[B, T]`` and the mask of target tokens, for labels laid out as above
    (decoder-only logits predict the next token, so they are shifted against the labels). With ``positions``
    (``target_logit_positions``), ``logits [B, len(positions), V]`` are the logits at those positions only."""
    if positions is not None:
        labels = labels[:, positions + 1]
    elif not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0), reduction="none")
    return losses, mask


def target_logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions of a decoder-only batch whose next-token logits predict a target token in some row.

    Only these logits enter the loss; the prompt's take most of the positions, and the vocabulary projection
    with its backward costs a third of a small model's training step when it runs over all of them.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def truncate(ids: list[int], limit: int, side: str) -> list[int]:
    if len(ids) <= limit:
        return ids
    return ids[-limit:] if side == "left" else ids[:limit]


def encode_prompt(tokenizer: Any, task: TaskConfig, prompt: str) -> list[int]:
    """The prompt's token ids as the model sees them (special tokens added, truncated per task)."""
    return truncate(tokenizer(prompt)["input_ids"], task.max_input_tokens, task.truncation)


def encode_target(tokenizer: Any, task: TaskConfig, target: str, seq2seq: bool) -> list[int]:
    """The target's token ids, ending in eos, truncated per task; tokenised apart from the prompt, so one
    label's ids are the same after every prompt (label scoring shares the prompt's forward)."""
    eos = tokenizer.eos_token_id
    if seq2seq:
        target_ids = tokenizer(text_target=target)["input_ids"]
        if eos is not None and (not target_ids or target_ids[-1] != eos):
            target_ids = [*target_ids, eos]
        return list(target_ids[: task.max_target_tokens])
    target_ids = tokenizer(task.target_prefix + target, add_special_tokens=False)["input_ids"]
    target_ids = target_ids[: task.max_target_tokens - (1 if eos is not None else 0)]
    return [*target_ids, eos] if eos is not None else list(target_ids)


def tokenize_example(
    tokenizer: Any, task: TaskConfig, task_id: int, prompt: str, target: str, seq2seq: bool
) -> TokenizedExample:
    """One example's token ids and labels for the model kind (see the module docstring)."""
    prompt_ids = encode_prompt(tokenizer, task, prompt)
    target_ids = encode_target(tokenizer, task, target, seq2seq)
    if seq2seq:
        return TokenizedExample(task_id, prompt_ids, target_ids, len(prompt_ids))
    return TokenizedExample(
        task_id, prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, len(prompt_ids)
    )


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Greedy packing of consecutive same-task examples into sequences of at most ``max_length`` tokens.

    Decoder-only only. Packed examples attend to earlier examples of the same sequence (no block-diagonal
    mask), the usual trade of plain packing; the prompt of each packed example stays out of the loss, and
    ``prompt_length`` covers the first example's prompt (what a gate pools over).
    """
    packed: list[TokenizedExample] = []
    current: TokenizedExample | None = None
    for example in examples:
        if len(example.input_ids) > max_length:
            example = TokenizedExample(
                example.task_id,
                example.input_ids[:max_length],
                example.labels[:max_length],
                min(example.prompt_length, max_length),
            )
        fits = current is not None and current.task_id == example.task_id
        if current is not None and fits and len(current.input_ids) + len(example.input_ids) <= max_length:
            current.input_ids += example.input_ids
            current.labels += example.labels
            continue
        if current is not None:
            packed.append(current)
        current = TokenizedExample(
            example.task_id, list(example.input_ids), list(example.labels), example.prompt_length
        )
    if current is not None:
        packed.append(current)
    return packed


def pad_rows(rows: Sequence[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """``rows`` of token ids as one ``[len(rows), longest]`` long tensor, padded with ``value`` on ``side``."""
    width = max((len(r) for r in rows), default=0)
    padded = [([value] * (width - len(r)) + r) if side == "left" else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


class MultiTaskCollator:
    """Pads tokenised examples into a batch: input_ids, attention_mask, labels, task_ids (+ prompt_mask)."""

    def __init__(self, pad_token_id: int, seq2seq: bool, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.seq2seq = seq2seq
        self.padding_side = padding_side

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        return pad_rows(rows, value, self.padding_side)

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        input_ids = self._pad([e.input_ids for e in examples], self.pad_token_id)
        attention_mask = self._pad([[1] * len(e.input_ids) for e in examples], 0)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": self._pad([e.labels for e in examples], IGNORE_INDEX),
            "task_ids": torch.tensor([e.task_id for e in examples], dtype=torch.long),
        }
        if not self.seq2seq:
            prompt = [[1] * e.prompt_length + [0] * (len(e.input_ids) - e.prompt_length) for e in examples]
            batch["prompt_mask"] = self._pad(prompt, 0)
        return batch
