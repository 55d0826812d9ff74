"""Transfer to an unseen task: place it among the known tasks by its inputs, then route it zero-shot or train
only its own routing (few-shot) on K examples.

Placement compares task vectors, each task's mean backbone state over its inputs
(``mta.task_embeddings.mean_input_states``, computed with the experts bypassed so a vector does not depend on
what they learned). The new task then starts from:

- ``nearest``: the routing of the known task whose vector is the most similar (cosine): its rows of every
  router's per-task tensors and of the task-embedding table, and its assigned experts;
- ``uniform``: no preference (zero task logits; the mean task embedding);
- ``inputs``: its own vector as its task embedding (task_embedding routers whose table holds input vectors:
  the routers' MLPs route it as they would a known task with such inputs).

Few-shot training then changes only the new task's rows (and, with ``own_expert``, the slices of its own new
expert): every other tensor of the model stays bit-identical, so the known tasks keep their outputs exactly.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from alter_ds.errors import UsageError
from alter_ds.mta.layer_experts import LayerBank
from alter_ds.mta.model import MTAModel
from alter_ds.mta.task_embeddings import mean_input_states

TransferInit = Literal["nearest", "uniform", "inputs"]
#: router tensors with one row per task (axis 0)
PER_TASK_TENSORS = ("task_logits", "task_embedding.weight")


@dataclasses.dataclass
class Placement:
    """Where an unseen task went: its id, the known task nearest to it, and every known task's similarity."""

    task_id: int
    nearest: str
    similarities: dict[str, float]


def task_vector(
    model: MTAModel, examples: Sequence[Any], collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
) -> torch.Tensor:
    """A task's mean input state over ``examples`` (tokenised; any task id, nothing routes)."""
    if not examples:
        raise UsageError("a task vector needs at least one example")
    batches = [collate(list(examples[i : i + 8])) for i in range(0, len(examples), 8)]
    for batch in batches:  # nothing routes with the experts bypassed: any valid id does
        batch["task_ids"] = torch.zeros_like(batch["task_ids"])
    return mean_input_states(model, batches)


def _per_task_tensors(model: MTAModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor with one row per task: routers' rows and the task-embedding table."""
    if model.task_embeddings is not None:
        yield "task_embeddings.weight", model.task_embeddings.weight
    for block_name, block in model.blocks.items():
        state = dict(block.router.named_parameters())
        for key in PER_TASK_TENSORS:
            if key in state:
                yield f"{block_name}.router.{key}", state[key]


def add_unseen_task(
    model: MTAModel,
    name: str,
    category: str,
    vector: torch.Tensor,
    known_vectors: torch.Tensor,
    init: TransferInit = "nearest",
    own_expert: bool = False,
) -> Placement:
    """Add task ``name`` placed by its ``vector`` among ``known_vectors`` (``[known tasks, width]``), its
    routing started as ``init`` says (see the module docstring). Without ``own_expert`` it shares the nearest
    task's experts; with it, it gets a new expert of its own (zero output at first)."""
    if known_vectors.shape[0] != len(model.tasks):
        raise UsageError(f"{known_vectors.shape[0]} task vectors for the model's {len(model.tasks)} tasks")
    if init == "inputs" and model.task_embeddings is None:  # refused before the model changes
        raise UsageError("init: inputs needs a task_embedding router (the model has no task-embedding table)")
    similarity = torch.nn.functional.cosine_similarity(known_vectors.float(), vector.float()[None], dim=-1)
    nearest = int(similarity.argmax())
    experts = None if own_expert else list(model.layout.task_experts[nearest])
    task = model.add_task(name, category, experts=experts)
    with torch.no_grad():
        for key, tensor in _per_task_tensors(model):
            if init == "nearest":
                tensor[task].copy_(tensor[nearest])
            elif init == "uniform":  # the mean task embedding; zero logits
                if key == "task_embeddings.weight":
                    tensor[task].copy_(tensor[:task].mean(0))
                else:
                    tensor[task].zero_()
            elif key == "task_embeddings.weight":  # inputs
                if tensor.shape[1] != vector.shape[0]:
                    raise UsageError(
                        f"init: inputs uses the task's input vector ({vector.shape[0]} wide) as its embedding, "
                        f"but the table is {tensor.shape[1]} wide"
                    )
                tensor[task].copy_(vector.to(tensor.dtype))
            else:
                tensor[task].copy_(tensor[nearest])
    names = model.task_names[:task]
    return Placement(task, names[nearest], {n: float(s) for n, s in zip(names, similarity)})


def _own_slices(model: MTAModel, task: int, own_expert: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask) of what few-shot training may change: the task's rows and its own expert's slices."""
    owned: list[tuple[nn.Parameter, torch.Tensor]] = []
    for _, tensor in _per_task_tensors(model):
        mask = torch.zeros_like(tensor)
        mask[task] = 1
        owned.append((tensor, mask))  # type: ignore[arg-type]
    if own_expert:
        owned += _expert_slices(model, model.layout.task_experts[task][:1])
    if not owned:
        raise UsageError(
            "this model's routers have no per-task parameters to train (hard or fixed routes): "
            "use own_expert to train a new expert, or transfer zero-shot"
        )
    return owned


def _expert_slices(model: MTAModel, experts: list[int]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask) of the task experts ``experts`` in every block's bank."""
    owned = []
    for block in model.blocks.values():
        if isinstance(block.task_experts, LayerBank):
            raise UsageError(
                "training experts in transfer needs stacked adapter experts (bottleneck or ffn), not layer copies"
            )
        for parameter in block.task_experts.weights():
            if parameter is not None:
                mask = torch.zeros_like(parameter)
                mask[experts] = 1
                owned.append((typing.cast(nn.Parameter, parameter), mask))
    return owned


def few_shot(
    model: MTAModel,
    task: int,
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    own_expert: bool = False,
    seed: int = 0,
) -> list[float]:
    """Train only task ``task``'s rows (and its own expert) for ``steps`` AdamW steps over ``batches`` (its
    K examples, drawn at random); returns the losses. Only those tensors are left trainable."""
    return _train_slices(model, task, batches, steps, lr, _own_slices(model, task, own_expert), seed)


def _train_slices(
    model: MTAModel,
    task: int,
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    owned: list[tuple[nn.Parameter, torch.Tensor]],
    seed: int = 0,
) -> list[float]:
    """AdamW without weight decay on the masked slices ``owned``: the gradients elsewhere are zero, so with
    Adam's zero moments nothing else moves by a single bit."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    handles = []
    for parameter, mask in owned:
        parameter.requires_grad_(True)
        handles.append(parameter.register_hook(lambda grad, mask=mask: grad * mask))
    optimizer = torch.optim.AdamW(list({id(p): p for p, _ in owned}.values()), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    try:
        for step in range(steps):
            batch = batches[int(torch.randint(len(batches), (1,), generator=generator))] if step else batches[0]
            inputs = {k: v for k, v in batch.items() if k != "task_ids"}
            optimizer.zero_grad(set_to_none=True)
            loss = model(**inputs, task_ids=torch.full_like(batch["task_ids"], task)).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    return losses


# ----------------------------------------------------------------------------------- alter-ds transfer
@dataclasses.dataclass
class TransferResult:
    """One unseen task's outcome in ``alter-ds transfer``."""

    task: str
    metric: str
    mode: str
    shots: int
    score: float
    examples: int
    nearest: str
    similarities: dict[str, float]
    baseline_score: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)


def transfer_run(
    run_dir: str,
    task_file: str,
    shots: int,
    stage: str | None = None,
    zero_shot: bool = False,
    init: TransferInit = "nearest",
    own_expert: bool = False,
    steps: int = 50,
    lr: float = 1e-2,
    baseline: str | None = None,
    max_examples: int | None = 200,
) -> list[TransferResult]:
    """``alter-ds transfer``: each task of ``task_file`` (``tasks: [...]``, as in an experiment config) added
    to a finished run's model, zero-shot or trained on its first ``shots`` training examples, and scored on
    its test split; with ``baseline`` (a single-adapter run) the same K examples train that model's adapter
    and it is scored on the same test examples. Writes ``transfer/<task>.json`` in the run."""
    import json
    from pathlib import Path

    import yaml

    from alter_ds.config import ExperimentConfig, TaskConfig, config_from_dict, expand_task_suite, load_config
    from alter_ds.data.collate import MultiTaskCollator
    from alter_ds.data.multitask import TokenizedTask
    from alter_ds.data.tasks import Example, load_split
    from alter_ds.errors import MissingFileError
    from alter_ds.evaluate import evaluate
    from alter_ds.mta.backbone import is_seq2seq, load_tokenizer
    from alter_ds.run import RunLayout

    root = Path(run_dir)
    config: ExperimentConfig = load_config(root / "config.yaml")
    layout = RunLayout.of(config, root)
    index = len(layout.stage_names) - 1 if stage is None else layout.stage_index(stage)
    if not layout.stage_finished(index):
        raise MissingFileError(f"{layout.model_dir(index)}: stage {layout.stage_names[index]!r} has not finished")
    if not Path(task_file).is_file():
        raise MissingFileError(f"no task file at {task_file}")
    entries = (yaml.safe_load(Path(task_file).read_text()) or {}).get("tasks")
    if isinstance(entries, dict):  # a suite: {suite: transfer, root: ..., override: ...}
        entries = expand_task_suite({"tasks": entries})["tasks"]
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{task_file}: list the unseen tasks under 'tasks:' (or name a suite: {{suite: transfer}})")
    unseen = [config_from_dict(TaskConfig, entry, f"{task_file} (tasks[{i}])") for i, entry in enumerate(entries)]
    clash = [t.name for t in unseen if t.name in {k.name for k in config.tasks}]
    if clash:
        raise UsageError(f"{task_file}: {clash} are tasks the run trained on, not unseen ones")
    tokenizer = load_tokenizer(config.model)
    seq2seq = is_seq2seq(config.model)
    collate = MultiTaskCollator(tokenizer.pad_token_id, seq2seq)
    vector_count = max(shots, 8)
    results = []
    for task in unseen:
        train = load_split(task, "train", config.data.root, config.seed).examples
        test = load_split(task, "test", config.data.root, config.seed).examples
        if len(train) < shots:
            raise UsageError(f"task {task.name!r} has {len(train)} training examples, fewer than --shots {shots}")
        scores = {}
        for name, source in (("model", root), ("baseline", Path(baseline) if baseline else None)):
            if source is None:
                continue
            is_model = name == "model"
            source_config: ExperimentConfig = load_config(source / "config.yaml")
            source_layout = RunLayout.of(source_config, source)
            source_index = index if is_model else len(source_layout.stage_names) - 1
            model = MTAModel.from_pretrained(source_layout.model_dir(source_index)).eval()
            known = [TokenizedTask(t, i, load_split(t, "train", config.data.root, config.seed).examples[:vector_count],
                                   tokenizer, seq2seq) for i, t in enumerate(source_config.tasks)]  # fmt: skip
            known_vectors = torch.stack([task_vector(model, list(k), collate) for k in known])
            new_id = len(source_config.tasks)
            shots_tokenized = list(TokenizedTask(task, new_id, train[: max(shots, 1)], tokenizer, seq2seq))
            vector = task_vector(model, shots_tokenized, collate)
            placement = add_unseen_task(
                model, task.name, task.category, vector, known_vectors, init if is_model else "nearest",
                own_expert and is_model,
            )  # fmt: skip
            losses: list[float] = []
            if not zero_shot and shots:
                batches = [collate(shots_tokenized[i : i + 8]) for i in range(0, len(shots_tokenized), 8)]
                if is_model:
                    losses = few_shot(model, placement.task_id, batches, steps, lr, own_expert)
                else:
                    assigned = _expert_slices(model, model.layout.task_experts[placement.task_id])
                    losses = _train_slices(model, placement.task_id, batches, steps, lr, assigned)
            tasks = [*source_config.tasks, task]
            examples: dict[str, list[Example]] = {t.name: [] for t in source_config.tasks} | {task.name: test}
            scored = evaluate(model, tokenizer, tasks, examples, seq2seq, 16, max_examples)[task.name]
            scores[name] = (scored, placement, losses)
        scored, placement, losses = scores["model"]
        result = TransferResult(
            task.name, scored["metric"], "zero-shot" if zero_shot or not shots else f"{shots}-shot", shots,
            float(scored["score"]), int(scored["examples"]), placement.nearest, placement.similarities,
            float(scores["baseline"][0]["score"]) if "baseline" in scores else None, losses,
        )  # fmt: skip
        out = root / "transfer"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{task.name}_{result.mode}.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
        results.append(result)
    return results
