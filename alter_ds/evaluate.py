"""Per-task evaluation with each task's metric, sharded over ranks and gathered, in bounded memory.

Classification tasks (a label verbaliser) are scored by the model's length-normalised log-likelihood of
each label text after the prompt (no free-form parsing); other tasks generate greedily. Each rank takes every
``world``-th example; only predictions (strings) are gathered, never logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alter_ds.config import TaskConfig
from alter_ds.data.collate import MultiTaskCollator, TokenizedExample, token_losses, tokenize_example, truncate
from alter_ds.data.tasks import Example
from alter_ds.metrics import score


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(items: list[Any]) -> list[Any]:
    import torch.distributed as dist

    _, world = _distributed()
    if world == 1:
        return items
    gathered: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


Item = tuple[int, int, Example]  # (task id, index in the task's split, example)


@torch.no_grad()
def _score_labels(
    model: Any, tokenizer: Any, tasks: Sequence[TaskConfig], items: list[Item], seq2seq: bool, batch_size: int
) -> list[str]:
    """Each item's best label by mean token log-likelihood; (item, label) pairs of all tasks share batches."""
    collator = MultiTaskCollator(tokenizer.pad_token_id, seq2seq, padding_side="right")
    candidates = [list(dict.fromkeys(tasks[task_id].labels.values())) for task_id, _, _ in items]
    pairs = [
        tokenize_example(tokenizer, tasks[task_id], task_id, example.prompt, label, seq2seq)
        for (task_id, _, example), labels in zip(items, candidates)
        for label in labels
    ]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collator(pairs[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch, labels=labels).logits if seq2seq else model(**batch).logits
        losses, mask = token_losses(logits, labels, seq2seq)
        scores += (-(losses * mask).sum(1) / mask.sum(1).clamp_min(1)).tolist()
    predictions, offset = [], 0
    for options in candidates:
        chunk = scores[offset : offset + len(options)]
        predictions.append(options[max(range(len(options)), key=chunk.__getitem__)])
        offset += len(options)
    return predictions


@torch.no_grad()
def _generate(
    model: Any, tokenizer: Any, tasks: Sequence[TaskConfig], items: list[Item], seq2seq: bool, batch_size: int
) -> list[str]:
    """Greedy generation over mixed-task batches: each batch generates up to its longest task's target
    limit, and each row keeps its own task's limit (greedy tokens do not depend on how long one goes on)."""
    collator = MultiTaskCollator(tokenizer.pad_token_id, seq2seq, padding_side="left")
    outputs: list[str] = []
    device = _device(model)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = []
        for task_id, _, example in chunk:
            task = tasks[task_id]
            ids = truncate(tokenizer(example.prompt)["input_ids"], task.max_input_tokens, task.truncation)
            prompts.append(TokenizedExample(task_id, ids, ids, len(ids)))
        batch = collator(prompts)
        limits = [tasks[task_id].max_target_tokens for task_id, _, _ in chunk]
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            task_ids=batch["task_ids"].to(device),
            max_new_tokens=max(limits),
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated if seq2seq else generated[:, batch["input_ids"].shape[1] :]
        rows = [row[: limit + (1 if seq2seq else 0)] for row, limit in zip(new_tokens.tolist(), limits)]
        outputs += [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]
    return outputs


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[TaskConfig],
    examples: dict[str, list[Example]],
    seq2seq: bool,
    batch_size: int = 16,
    max_examples: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``{task: {"metric", "score", "examples"}}`` on every rank; ``examples`` holds each task's split.

    Rank r takes every world-th example of each task; classification and generation items each run in
    mixed-task batches; only (task, index, prediction) triples are gathered.
    """
    rank, world = _distributed()
    items: list[Item] = []
    for task_id, task in enumerate(tasks):
        chosen = examples[task.name][:max_examples] if max_examples else examples[task.name]
        items += [(task_id, index, chosen[index]) for index in range(rank, len(chosen), world)]
    scored = [item for item in items if tasks[item[0]].labels]
    generated = [item for item in items if not tasks[item[0]].labels]
    was_training = model.training
    model.eval()
    try:
        predictions = _score_labels(model, tokenizer, tasks, scored, seq2seq, batch_size) if scored else []
        predictions += _generate(model, tokenizer, tasks, generated, seq2seq, batch_size) if generated else []
    finally:
        model.train(was_training)
    triples = _gather([(t, i, p) for (t, i, _), p in zip(scored + generated, predictions)])
    results: dict[str, dict[str, Any]] = {}
    for task_id, task in enumerate(tasks):
        chosen = examples[task.name][:max_examples] if max_examples else examples[task.name]
        mine = sorted((index, prediction) for t, index, prediction in triples if t == task_id)
        predicted = [p for _, p in mine]
        references = [chosen[index].target for index, _ in mine]
        results[task.name] = {
            "metric": task.metric,
            "score": score(task.metric, predicted, references) if mine else float("nan"),
            "examples": len(mine),
            "samples": [{"prediction": p, "reference": r} for p, r in list(zip(predicted, references))[:3]],
        }
    return results


def format_results(columns: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A per-task table: one column per evaluated model (e.g. backbone, stage1, stage2)."""
    names = list(columns)
    tasks = list(next(iter(columns.values()))) if columns else []
    header = f"{'task':<20}{'metric':<12}" + "".join(f"{n:>12}" for n in names)
    lines = [header, "-" * len(header)]
    for task in tasks:
        metric = columns[names[0]][task]["metric"]
        cells = "".join(f"{columns[n][task]['score']:>12.2f}" if task in columns[n] else f"{'-':>12}" for n in names)
        lines.append(f"{task:<20}{metric:<12}{cells}")
    return "\n".join(lines)


def evaluate_run(
    run_dir: str, stage: str | None = None, split: str = "test", max_examples: int | None = None
) -> dict[str, Any]:
    """Evaluate the model a finished stage exported, on ``split``; writes ``eval/<stage>_<split>.json``."""
    import json
    from pathlib import Path

    from alter_ds.config import ExperimentConfig, load_config
    from alter_ds.data.tasks import split_examples
    from alter_ds.mta.model import MTAModel

    root = Path(run_dir)
    config: ExperimentConfig = load_config(root / "config.yaml")
    names = [s.name for s in config.stages]
    index = len(names) - 1 if stage is None else (int(stage) - 1 if stage.isdigit() else names.index(stage))
    if not 0 <= index < len(names):
        raise ValueError(f"--stage {stage}: the run has stages {names}")
    model_dir = root / f"stage{index + 1}" / "model"
    if not (model_dir / "mta_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} does not exist: stage {names[index]!r} has not finished")
    from alter_ds.mta.backbone import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = MTAModel.from_pretrained(model_dir)
    examples = split_examples(config.tasks, split, config.data.root, config.seed)
    results = evaluate(
        model,
        tokenizer,
        config.tasks,
        examples,
        model.is_encoder_decoder,
        config.training.eval_batch_size,
        max_examples,
    )
    out = root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{names[index]}_{split}.json").write_text(json.dumps(results, indent=2))
    print(format_results({f"{names[index]} ({split})": results}))
    return results
