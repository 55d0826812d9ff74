"""Per-task evaluation with each task's metric, sharded over ranks and gathered, in bounded memory.

Classification tasks (a label verbaliser) are scored by the model's length-normalised log-likelihood of
each label text after the prompt (no free-form parsing); other tasks generate greedily. Each rank takes every
``world``-th example; only predictions (strings) are gathered, never logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from alter_ds.config import TaskConfig
from alter_ds.data.collate import IGNORE_INDEX, MultiTaskCollator, TokenizedExample, _truncate, tokenize_example
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


@torch.no_grad()
def _score_labels(
    model: Any, tokenizer: Any, task: TaskConfig, task_id: int, examples: list[Example], seq2seq: bool, batch_size: int
) -> list[str]:
    candidates = list(dict.fromkeys(task.labels.values()))
    collator = MultiTaskCollator(tokenizer.pad_token_id, seq2seq, padding_side="right")
    pairs = [tokenize_example(tokenizer, task, task_id, e.prompt, c, seq2seq) for e in examples for c in candidates]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collator(pairs[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch, labels=labels).logits.float() if seq2seq else model(**batch).logits.float()
        if not seq2seq:
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX
        token_logprobs = -F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        scores += ((token_logprobs * mask).sum(1) / mask.sum(1).clamp_min(1)).tolist()
    table = torch.tensor(scores).reshape(len(examples), len(candidates))
    return [candidates[i] for i in table.argmax(1).tolist()]


@torch.no_grad()
def _generate(
    model: Any, tokenizer: Any, task: TaskConfig, task_id: int, examples: list[Example], seq2seq: bool, batch_size: int
) -> list[str]:
    collator = MultiTaskCollator(tokenizer.pad_token_id, seq2seq, padding_side="left")
    outputs: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [
            TokenizedExample(task_id, ids, ids, len(ids))
            for ids in (
                _truncate(tokenizer(e.prompt)["input_ids"], task.max_input_tokens, task.truncation) for e in chunk
            )
        ]
        batch = collator(prompts)
        device = _device(model)
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            task_ids=batch["task_ids"].to(device),
            max_new_tokens=task.max_target_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated if seq2seq else generated[:, batch["input_ids"].shape[1] :]
        outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
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
    """``{task: {"metric", "score", "examples"}}`` on every rank; ``examples`` holds each task's split."""
    rank, world = _distributed()
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for task_id, task in enumerate(tasks):
            chosen = examples[task.name][:max_examples] if max_examples else examples[task.name]
            shard = chosen[rank::world]
            run = _score_labels if task.labels else _generate
            predictions = run(model, tokenizer, task, task_id, shard, seq2seq, batch_size) if shard else []
            pairs = _gather([(rank + i * world, p, e.target) for i, (p, e) in enumerate(zip(predictions, shard))])
            pairs.sort(key=lambda item: item[0])
            results[task.name] = {
                "metric": task.metric,
                "score": score(task.metric, [p for _, p, _ in pairs], [r for _, _, r in pairs]),
                "examples": len(pairs),
                "samples": [{"prediction": p, "reference": r} for _, p, r in pairs[:3]],
            }
    finally:
        model.train(was_training)
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
    from alter_ds.data.tasks import load_split
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
    from transformers import AutoTokenizer

    options = {"gguf_file": config.model.gguf_file} if config.model.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(config.model.name_or_path, **options)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = MTAModel.from_pretrained(model_dir)
    examples = {t.name: load_split(t, split, config.data.root, config.seed).examples for t in config.tasks}
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
