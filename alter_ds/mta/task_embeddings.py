"""Task vectors from a task's inputs: the mean-pooled hidden states of its examples.

The task-level MoE initialises its task-embedding table this way (tasks whose inputs look alike start near
each other, so their routes can start alike), and the same vector places an unseen task among the known ones.
The states are the backbone's final hidden states over the prompt (decoder-only) or the encoder output
(seq2seq), computed with every MTA block giving back what the backbone computed there
(``MTAModel.pretrained_only``): a task's vector never depends on what the experts have learned, so vectors
computed at stage 1 and for an unseen task later are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from alter_ds.errors import UsageError
from alter_ds.mta.inject import hidden_width

if TYPE_CHECKING:
    from alter_ds.mta.model import MTAModel


@torch.no_grad()
def mean_input_states(
    model: MTAModel,
    batches: Sequence[dict[str, torch.Tensor]],
) -> torch.Tensor:
    """``[width]``: the mean over ``batches``' examples of each example's mean backbone state over its input.

    Each batch is a collated one task's examples (input_ids, attention_mask, task_ids, and prompt_mask for a
    decoder-only model, so that the target tokens of a training example are not pooled). The task ids only
    satisfy the model's interface: with every block giving back the backbone's computation, nothing routes.
    """
    if not batches:
        raise UsageError("mean_input_states needs at least one batch of examples")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(hidden_width(model.backbone), device=device)
    count = 0
    try:
        with model.pretrained_only():
            for batch in batches:
                pooled = _pooled_states(model, batch, device)
                total += pooled.float().sum(0)
                count += int(pooled.shape[0])
    finally:
        model.train(was_training)
    return total / count


def _pooled_states(model: MTAModel, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[B, width]``: each example's final hidden states averaged over its prompt (or encoder input)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    task_ids = batch["task_ids"].to(device)
    if model.is_encoder_decoder:
        encoder = model.backbone.get_encoder()  # type: ignore[operator]
        with model.routed(task_ids, int(task_ids.shape[0])):
            hidden = encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
    else:
        prompt_mask = batch.get("prompt_mask")
        out = model(**inputs, task_ids=task_ids, prompt_mask=prompt_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = (prompt_mask if prompt_mask is not None else inputs["attention_mask"]).to(device)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def init_from_inputs(
    model: MTAModel,
    examples: Sequence[Sequence[Any]],
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
    count: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Set row t of the model's task-embedding table to the mean input state of task t's first ``count``
    ``examples[t]`` (tokenised examples; ``collate`` batches them). Returns the table's new values."""
    table = model.task_embeddings
    if table is None:
        raise UsageError("embedding_init: inputs needs router kind task_embedding (the model has no table)")
    if len(examples) != len(model.tasks):
        raise UsageError(f"embedding_init: inputs got examples of {len(examples)} tasks for {len(model.tasks)}")
    rows = []
    for task, task_examples in zip(model.task_names, examples):
        chosen = [task_examples[i] for i in range(min(count, len(task_examples)))]
        if not chosen:
            raise UsageError(f"embedding_init: inputs: task {task!r} has no training examples")
        batches = [collate(chosen[i : i + batch_size]) for i in range(0, len(chosen), batch_size)]
        rows.append(mean_input_states(model, batches))
    states = torch.stack(rows)
    if states.shape != table.weight.shape:
        raise UsageError(
            f"embedding_init: inputs gives vectors of the backbone's width {states.shape[1]}, but the table has "
            f"{table.embedding_dim} (set router.task_embedding_dim to 0 or {states.shape[1]})"
        )
    with torch.no_grad():
        table.weight.copy_(states.to(table.weight.dtype))
    model.fresh_task_embeddings = False
    return table.weight.detach().clone()
