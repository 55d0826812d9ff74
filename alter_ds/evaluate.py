"""Per-task evaluation with each task's metric, sharded over ranks and gathered, in bounded memory.

Classification tasks (a label verbaliser) are scored by the model's length-normalised log-likelihood of
each label text after the prompt (no free-form parsing); other tasks generate greedily. Each rank takes every
``world``-th example; only predictions (strings) are gathered, never logits.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alter_ds.config import TaskConfig
from alter_ds.data.collate import (
    IGNORE_INDEX,
    MultiTaskCollator,
    TokenizedExample,
    encode_prompt,
    encode_target,
    pad_rows,
    token_losses,
    tokenize_example,
)
from alter_ds.data.tasks import Example
from alter_ds.errors import MissingFileError
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


def _label_options(task: TaskConfig) -> list[str]:
    return list(dict.fromkeys(task.labels.values()))


def _predict(options: list[str], scores: list[float]) -> str:
    return options[max(range(len(options)), key=scores.__getitem__)]


@torch.no_grad()
def _score_labels(
    model: Any, tokenizer: Any, tasks: Sequence[TaskConfig], items: list[Item], seq2seq: bool, batch_size: int
) -> list[str]:
    """Each item's best label by mean token log-likelihood (length-normalised, eos included)."""
    if _shares_prompts(model, seq2seq):
        scores = label_scores_shared_prompt(model, tokenizer, tasks, items, seq2seq, batch_size)
    else:
        scores = label_scores_per_pair(model, tokenizer, tasks, items, seq2seq, batch_size)
    return [_predict(_label_options(tasks[task_id]), row) for (task_id, _, _), row in zip(items, scores)]


def _shares_prompts(model: Any, seq2seq: bool) -> bool:
    """The shared-prompt path needs the routing context (an MTAModel) and, for decoder-only models, a
    backbone that takes ``position_ids`` (so a left-padded prompt sees the positions of a right-padded one)."""
    if not hasattr(model, "routed"):
        return False
    return seq2seq or model.backbone_accepts("position_ids")


@torch.no_grad()
def label_scores_per_pair(
    model: Any, tokenizer: Any, tasks: Sequence[TaskConfig], items: list[Item], seq2seq: bool, batch_size: int
) -> list[list[float]]:
    """Mean label-token log-likelihood of every (item, label) pair, one full forward per pair.

    The reference for ``label_scores_shared_prompt``: (item, label) pairs of all tasks share batches.
    """
    collator = MultiTaskCollator(tokenizer.pad_token_id, seq2seq, padding_side="right")
    candidates = [_label_options(tasks[task_id]) for task_id, _, _ in items]
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
    rows, offset = [], 0
    for options in candidates:
        rows.append(scores[offset : offset + len(options)])
        offset += len(options)
    return rows


#: label-scoring rows x label tokens per continuation forward: bounds the [rows, tokens, vocab] logits
SHARED_PROMPT_TOKEN_BUDGET = 1024


@torch.no_grad()
def label_scores_shared_prompt(
    model: Any, tokenizer: Any, tasks: Sequence[TaskConfig], items: list[Item], seq2seq: bool, batch_size: int
) -> list[list[float]]:
    """``label_scores_per_pair`` from one prompt forward per item instead of one per (item, label).

    Items are grouped by task, so every prompt of a chunk has the same labels. Decoder-only: the prompts run
    once, left-padded with explicit positions, into a KV cache that is repeated for each label; the labels'
    tokens then run on top of it, and the prompt's last logits score each label's first token.
    Encoder-decoder: the encoder runs once per prompt and its output is repeated for each label's decoder
    pass. Routing is the same as the per-pair forward: task ids repeat with the rows and gate features are
    pooled over the prompt tokens on the prompt's forward and reused (``MTAModel.routed``).
    """
    device = _device(model)
    by_task: dict[int, list[int]] = {}
    for position, (task_id, _, _) in enumerate(items):
        by_task.setdefault(task_id, []).append(position)
    scores: list[list[float]] = [[] for _ in items]
    for task_id, positions in by_task.items():
        task = tasks[task_id]
        label_ids = [encode_target(tokenizer, task, label, seq2seq) for label in _label_options(task)]
        width = max(len(ids) for ids in label_ids)
        per_chunk = max(1, min(batch_size, SHARED_PROMPT_TOKEN_BUDGET // (len(label_ids) * width)))
        score_chunk = _seq2seq_label_scores if seq2seq else _decoder_label_scores
        prompts = {p: encode_prompt(tokenizer, task, items[p][2].prompt) for p in positions}
        ordered = largest_first({p: len(prompts[p]) for p in positions})
        for start in range(0, len(ordered), per_chunk):
            chunk = ordered[start : start + per_chunk]
            rows = score_chunk(model, [prompts[p] for p in chunk], label_ids, task_id, tokenizer.pad_token_id, device)
            for position, row in zip(chunk, rows):
                scores[position] = row
    return scores


def largest_first(sizes: Mapping[int, Any]) -> list[int]:
    """The keys of ``sizes`` by decreasing size (stable), so that neighbours, batched together, pad little. A
    row's result does not depend on what else its batch holds, so the order changes the cost, not the scores;
    the largest batch first puts the peak memory at the start."""
    return sorted(sizes, key=sizes.__getitem__, reverse=True)


def _mean_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked target tokens of log p(target), per row; ``logits [R, T, V]``, ``targets [R, T]``."""
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (log_probs * mask).sum(1)


def _decoder_label_scores(
    model: Any, prompts: list[list[int]], label_ids: list[list[int]], task_id: int, pad: int, device: torch.device
) -> list[list[float]]:
    """The prompts once into a KV cache, then each group of equally long labels on a copy of it: labels of
    2 and 11 tokens never share a padded batch (a group's rows are the group's labels, repeated per prompt)."""
    num_prompts = len(prompts)
    input_ids = pad_rows(prompts, pad, "left").to(device)
    attention = pad_rows([[1] * len(p) for p in prompts], 0, "left").to(device)
    positions = (attention.cumsum(1) - 1).clamp_min(0)
    last_only = {"logits_to_keep": 1} if model.backbone_accepts("logits_to_keep") else {}  # the prompt's last only
    cache_key = "cache" if model.backbone_accepts("cache") else "past_key_values"  # transformers 5.x / 4.x
    groups: dict[int, list[int]] = {}
    for index, ids in enumerate(label_ids):
        groups.setdefault(len(ids), []).append(index)
    scores = torch.empty(num_prompts, len(label_ids))
    with model.routed([task_id] * num_prompts, generating=True):
        out = model.backbone(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **last_only
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [P, V]: every label's first token
        remaining = sum(width > 1 for width in groups)
        for width, members in sorted(groups.items()):
            tokens = torch.tensor([label_ids[m] for m in members], device=device)  # [G, width]
            total = first[:, tokens[:, 0]]  # [P, G]
            if width > 1:  # the tokens before the last on top of the prompt's cache, one row per (prompt, label)
                remaining -= 1
                cache = getattr(out, cache_key)
                cache = copy.deepcopy(cache) if remaining else cache  # the forward appends to the cache it gets
                cache.batch_repeat_interleave(len(members))
                rows = num_prompts * len(members)
                later = model.backbone(
                    input_ids=tokens[:, :-1].repeat(num_prompts, 1),
                    attention_mask=torch.cat(
                        [attention.repeat_interleave(len(members), 0), attention.new_ones(rows, width - 1)], dim=1
                    ),
                    position_ids=attention.sum(1).repeat_interleave(len(members))[:, None]
                    + torch.arange(width - 1, device=device),
                    use_cache=False,
                    **{cache_key: cache},
                )
                targets = tokens[:, 1:].repeat(num_prompts, 1)
                later_total = _mean_log_likelihood(later.logits, targets, torch.ones_like(targets, dtype=torch.float))
                total = total + later_total.reshape(num_prompts, len(members))
            scores[:, members] = total.cpu() / width
    return scores.tolist()


def _seq2seq_label_scores(
    model: Any, prompts: list[list[int]], label_ids: list[list[int]], task_id: int, pad: int, device: torch.device
) -> list[list[float]]:
    from transformers.modeling_outputs import BaseModelOutput

    num_labels = len(label_ids)
    input_ids = pad_rows(prompts, pad).to(device)
    attention = pad_rows([[1] * len(p) for p in prompts], 0).to(device)
    with model.routed([task_id] * len(prompts)):
        encoded = model.backbone.get_encoder()(input_ids=input_ids, attention_mask=attention)
    hidden = encoded.last_hidden_state.repeat_interleave(num_labels, 0)
    labels = pad_rows(label_ids, IGNORE_INDEX).to(device).repeat(len(prompts), 1)
    logits = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
        attention_mask=attention.repeat_interleave(num_labels, 0),
        labels=labels,
        task_ids=[task_id] * hidden.shape[0],
    ).logits
    mask = (labels != IGNORE_INDEX).float()
    return (_mean_log_likelihood(logits, labels, mask) / mask.sum(1)).reshape(len(prompts), num_labels).tolist()


@torch.no_grad()
def _generate(
    model: Any, tokenizer: Any, tasks: Sequence[TaskConfig], items: list[Item], seq2seq: bool, batch_size: int
) -> list[str]:
    """Greedy generation over mixed-task batches: each batch generates up to its longest task's target
    limit, and each row keeps its own task's limit (greedy tokens do not depend on how long one goes on)."""
    collator = MultiTaskCollator(tokenizer.pad_token_id, seq2seq, padding_side="left")
    outputs: list[str] = ["" for _ in items]
    device = _device(model)
    encoded = [encode_prompt(tokenizer, tasks[task_id], example.prompt) for task_id, _, example in items]
    limits = [tasks[task_id].max_target_tokens for task_id, _, _ in items]
    # by target limit, then prompt length: a batch generates up to its largest limit and pads to its longest prompt
    ordered = largest_first({i: (limits[i], len(encoded[i])) for i in range(len(items))})
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        batch = collator([TokenizedExample(items[i][0], encoded[i], encoded[i], len(encoded[i])) for i in chunk])
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            task_ids=batch["task_ids"].to(device),
            max_new_tokens=max(limits[i] for i in chunk),
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated if seq2seq else generated[:, batch["input_ids"].shape[1] :]
        rows = [
            row[: limit + (1 if seq2seq else 0)] for row, limit in zip(new_tokens.tolist(), (limits[i] for i in chunk))
        ]
        for i, text in zip(chunk, tokenizer.batch_decode(rows, skip_special_tokens=True)):
            outputs[i] = text.strip()
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


def format_results(columns: dict[str, dict[str, dict[str, Any]]], delta: bool = False) -> str:
    """A per-task table: one column per evaluated model (e.g. backbone, stage1, stage2); with ``delta`` and at
    least two columns, a last column with the last model's score minus the first's."""
    names = list(columns)
    tasks = list(next(iter(columns.values()))) if columns else []
    delta = delta and len(names) >= 2
    change = f"{names[-1]} - {names[0]}" if delta else ""
    header = f"{'task':<20}{'metric':<12}" + "".join(f"{n:>12}" for n in names)
    header += f"{change:>{max(len(change) + 2, 12)}}" if delta else ""
    lines = [header, "-" * len(header)]
    for task in tasks:
        metric = columns[names[0]][task]["metric"]
        cells = "".join(f"{columns[n][task]['score']:>12.2f}" if task in columns[n] else f"{'-':>12}" for n in names)
        if delta and task in columns[names[-1]]:
            difference = columns[names[-1]][task]["score"] - columns[names[0]][task]["score"]
            cells += f"{difference:>+{max(len(change) + 2, 12)}.2f}"
        lines.append(f"{task:<20}{metric:<12}{cells}")
    return "\n".join(lines)


def evaluate_run(
    run_dir: str, stage: str | None = None, split: str = "test", max_examples: int | None = None
) -> dict[str, Any]:
    """Evaluate the model a finished stage exported, on ``split``; writes ``eval/<stage>_<split>_<n|all>.json``."""
    import json
    from pathlib import Path

    from alter_ds.config import ExperimentConfig, load_config
    from alter_ds.data.tasks import split_examples
    from alter_ds.mta.model import MTAModel
    from alter_ds.run import RunLayout

    root = Path(run_dir)
    config: ExperimentConfig = load_config(root / "config.yaml")
    layout = RunLayout.of(config, root)
    index = len(layout.stage_names) - 1 if stage is None else layout.stage_index(stage)
    name = layout.stage_names[index]
    model_dir = layout.model_dir(index)
    if not (model_dir / "mta_config.json").is_file():
        raise MissingFileError(f"{model_dir} does not exist: stage {name!r} has not finished")
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
    out = layout.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    # never the name training writes (eval/<stage>_dev.json): that one keeps the numbers the run printed
    (out / f"{name}_{split}_{'all' if max_examples is None else max_examples}.json").write_text(
        json.dumps(results, indent=2)
    )
    print(format_results({f"{name} ({split})": results}))
    return results
