"""Train the stages of an experiment with DeepSpeed ZeRO-2.

    deepspeed --num_gpus 2 alter_ds/train.py --config configs/alter-ds.yaml --stage all
    torchrun --nproc_per_node 2 alter_ds/train.py --config configs/alter-ds.yaml --stage 1

Each stage builds its model (the backbone, or the model an earlier stage exported), applies itself (experts
to add, router, trainable groups), builds a fresh DeepSpeed engine over its trainable parameters and trains
for its steps on mixed-task batches, checkpointing along the way; then it evaluates on dev and exports the
model with ``save_pretrained`` into ``runs/<run_name>/stage<i>/model``, where the next stage starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by the launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alter_ds.checkpoint import (
    StopRequest,
    find_checkpoint,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from alter_ds.config import ExperimentConfig, StageConfig, load_config, save_config
from alter_ds.data.collate import MultiTaskCollator, target_logit_positions, token_losses
from alter_ds.data.multitask import MultiTaskData, TrainBatches
from alter_ds.data.tasks import Example, split_examples
from alter_ds.errors import AlterDsError
from alter_ds.evaluate import evaluate, format_results
from alter_ds.launch import add_training_arguments
from alter_ds.logs import RunLogger
from alter_ds.mta.backbone import is_seq2seq, load_tokenizer
from alter_ds.mta.model import MTAModel, build_model
from alter_ds.mta.task_embeddings import init_from_inputs
from alter_ds.run import RunLayout

REPO = Path(__file__).resolve().parents[1]


class TrainingError(AlterDsError, RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# ------------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def init_distributed() -> tuple[int, int, str]:
    """Start the process group (gloo on CPU, nccl on GPUs) the way the launcher or torchrun asks; returns the
    rank, the world size and the accelerator's name."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    with contextlib.redirect_stdout(io.StringIO()):  # on CPU each rank prints that it built its shm comm op
        deepspeed.init_distributed(dist_backend="gloo" if accelerator == "cpu" else None)
    import torch.distributed as dist

    if accelerator != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size(), accelerator


def _rank_device() -> torch.device:
    """The device this rank computes on (and every collective's tensors live on)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def quiet_libraries(rank: int) -> None:
    """One voice: rank 0 prints the run's own lines and one progress bar per stage; library progress bars
    (``datasets`` map, ``transformers`` weight loading), DeepSpeed's INFO lines and the deprecation notices it
    triggers are off, and the other ranks keep to warnings of their own."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    if rank != 0:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)


def deepspeed_config(config: ExperimentConfig, world_size: int, accelerator: str) -> dict[str, Any]:
    """The base JSON with the YAML's batch, accumulation, clipping and precision written in."""
    training = config.training
    name = training.deepspeed_config
    if name == "auto":
        name = "ds_configs/zero2_cpu_fp32.json" if accelerator == "cpu" else "ds_configs/zero2_gpu_bf16.json"
    path = Path(name) if Path(name).is_file() else REPO / name
    if not path.is_file():
        raise TrainingError(f"training.deepspeed_config: {name} not found")
    ds = json.loads(path.read_text())
    ds.pop("optimizer", None)  # the trainer passes its own optimizer and schedule (per-group weight decay)
    ds.pop("scheduler", None)
    bf16 = training.precision == "bf16" or (training.precision == "auto" and accelerator != "cpu")
    ds.update(
        train_micro_batch_size_per_gpu=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        train_batch_size=training.micro_batch_size * training.gradient_accumulation_steps * world_size,
        gradient_clipping=training.gradient_clipping,
        bf16={"enabled": bf16},
        fp16={"enabled": False},
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
    )
    zero_stage = ds.setdefault("zero_optimization", {"stage": 2}).get("stage", 0)
    if zero_stage not in (1, 2):
        raise TrainingError(
            f"{path}: zero_optimization.stage is {zero_stage}; alter-ds trains with ZeRO stage 1 or 2 (its "
            f"checkpoints are ZeRO partitions, and ZeRO skips a step whose gradients are not finite)"
        )
    return ds


def stage_source(config: ExperimentConfig, index: int, layout: RunLayout) -> Path | None:
    """Where the model an earlier stage exported lies, for a stage that starts from it (None: the backbone)."""
    name = config.stages[index].init_from
    if name is None:
        return None
    return layout.model_dir(layout.stage_index(name))


def stage_model(config: ExperimentConfig, index: int, layout: RunLayout) -> MTAModel:
    """The model a stage starts from: the backbone, or the model an earlier stage exported."""
    stage = config.stages[index]
    source = stage_source(config, index, layout)
    if source is None:
        return build_model(config)
    if not (source / "mta_config.json").is_file():
        raise TrainingError(
            f"stage {stage.name!r} starts from stage {stage.init_from!r}, but {source} does not exist: "
            f"run that stage first (--stage {stage.init_from})"
        )
    return MTAModel.from_pretrained(source)


def optimizer_and_schedule(model: MTAModel, stage: StageConfig, config: ExperimentConfig) -> tuple[Any, Any]:
    """AdamW with weight decay on backbone weights only: experts and routers that see no tokens in a step
    still get a (zero) gradient under ZeRO-2, and decay would shrink them for nothing. Parameter groups named
    in ``stage.group_lr`` get their own rate; the schedule scales every rate by the same factor."""
    grouped: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for group, _, parameter in model.named_parameter_groups():
        if parameter.requires_grad:
            decay = config.training.weight_decay if group == "backbone" and parameter.dim() > 1 else 0.0
            grouped.setdefault((stage.group_lr.get(group, stage.lr), decay), []).append(parameter)
    if not grouped:
        raise TrainingError(f"stage {stage.name!r} trains nothing: its train list {stage.train} matched no parameter")
    # the stage's own rate first: the logged train/lr is the first group's
    order = sorted(grouped, key=lambda key: (key[0] != stage.lr, key))
    groups = [{"params": grouped[key], "lr": key[0], "weight_decay": key[1]} for key in order]
    optimizer = torch.optim.AdamW(groups, lr=stage.lr)
    warmup, total, kind = config.training.warmup_steps, max(stage.steps, 1), config.training.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_batch_loss(
    engine: Any, model: MTAModel, batch: dict[str, torch.Tensor], num_tasks: int, seq2seq: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's training loss (mean over its target tokens) and ``[2, tasks]`` summed token loss and
    token count per task, for logging, both from one cross-entropy over the vocabulary: the backbone is not
    given the labels, so it computes no loss of its own. A decoder-only backbone that can projects only the
    positions that predict a target onto the vocabulary (``target_logit_positions``)."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    if seq2seq:
        prepare = getattr(model.backbone, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None:
            inputs["decoder_input_ids"] = prepare(labels=labels)
        else:  # the backbone shifts the labels itself (and computes a loss that goes unused)
            inputs["labels"] = labels
    positions = None
    if not seq2seq and model.backbone_accepts("logits_to_keep"):
        positions = target_logit_positions(labels)
        inputs["logits_to_keep"] = positions
    output = engine(**inputs)
    losses, mask = token_losses(output.logits, labels, seq2seq, positions)
    example_loss = (losses * mask).sum(1)
    example_tokens = mask.sum(1)
    sums = torch.zeros(2, num_tasks, device=losses.device)
    sums[0].index_add_(0, batch["task_ids"], example_loss.detach())
    sums[1].index_add_(0, batch["task_ids"], example_tokens.float())
    return example_loss.sum() / example_tokens.sum().clamp_min(1), sums


# ------------------------------------------------------------------------------------------- stage
@dataclasses.dataclass
class RunContext:
    """What every stage of one run shares: this rank's place, the data, the tokenizer, the logger and the
    stop request (set once in ``main``)."""

    layout: RunLayout
    rank: int
    world: int
    accelerator: str
    device: torch.device  # this rank's compute device, where every collective's tensors live
    tokenizer: Any
    seq2seq: bool
    stop: StopRequest
    train_data: MultiTaskData
    dev: dict[str, list[Example]]
    logger: RunLogger
    resume: bool = True  # --resume auto: skip finished stages and continue from the latest checkpoint
    backbone_results: dict[str, Any] | None = None  # the backbone's dev scores, before the first stage


@dataclasses.dataclass
class StepResult:
    """One optimizer step: whether ZeRO applied it, and what its micro-batches add to the log."""

    applied: bool
    loss_sums: torch.Tensor  # [2, tasks] on the device: summed token loss, token count
    tokens: int
    samples: int
    lr: float  # the rate the update used


def train_step(
    engine: Any, model: MTAModel, batches: TrainBatches, accumulation: int, num_tasks: int, seq2seq: bool
) -> StepResult:
    """Run one optimizer step's micro-batches, forward and backward, with DeepSpeed stepping at the boundary.

    ZeRO checks the reduced gradients of the whole step (every micro-batch, every rank) and skips the update,
    and the schedule, when one is not finite, so every rank decides the same without an extra vote, and a bad
    micro-batch never moves the accumulation boundary.
    """
    lr = float(engine.get_lr()[0])  # read before: after the step, the schedule has moved on
    sums = torch.zeros(2, num_tasks, device=engine.device)
    tokens = samples = 0
    for _ in range(accumulation):
        host_batch = batches.next_batch()
        tokens += int(host_batch["attention_mask"].sum())
        samples += int(host_batch["input_ids"].shape[0])
        batch = {key: value.to(engine.device) for key, value in host_batch.items()}
        loss, batch_sums = micro_batch_loss(engine, model, batch, num_tasks, seq2seq)
        engine.backward(loss)
        engine.step()
        sums += batch_sums
    return StepResult(bool(engine.was_step_applied()), sums, tokens, samples, lr)


def train_stage(config: ExperimentConfig, index: int, run: RunContext) -> dict[str, Any]:
    """Train stage ``index`` to its last step (resuming from its checkpoint), evaluate it on dev, export it."""
    import deepspeed
    import torch.distributed as dist

    layout, rank, world, logger = run.layout, run.rank, run.world, run.logger
    stage = config.stages[index]
    if run.resume and layout.stage_finished(index):
        if rank == 0:
            print(f"stage {stage.name} already finished ({layout.model_dir(index)}); skipping")
        return dict(json.loads(layout.summary_file(index).read_text()))
    checkpoints = layout.checkpoints(index)

    torch.manual_seed(config.seed + 1000 * index + rank)
    model = stage_model(config, index, layout)
    counts = model.apply_stage(stage)
    if rank == 0:
        origin = stage_source(config, index, layout) or "the backbone"
        print(
            f"\n== stage {index + 1} ({stage.name}): router {stage.router.kind}, trains {', '.join(stage.train)}; "
            f"starts from {origin}"
        )
        print(model.format_parameter_counts())
    collator = MultiTaskCollator(run.tokenizer.pad_token_id, run.seq2seq)
    if (
        stage.router.kind == "task_embedding"
        and stage.router.embedding_init == "inputs"
        and model.fresh_task_embeddings
    ):
        init_from_inputs(model, run.train_data.examples, collator, stage.router.embedding_examples)
        if rank == 0:
            print(f"task embeddings: each task's mean input state over {stage.router.embedding_examples} examples")
    if config.training.activation_checkpointing:
        model.activation_checkpointing_enable()
    saved = find_checkpoint(checkpoints) if run.resume else None
    if saved is not None and saved.world_size != world:
        config = _keep_global_batch(config, saved.world_size, world, rank)
    ds_config = deepspeed_config(config, world, run.accelerator)
    optimizer, schedule = optimizer_and_schedule(model, stage, config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if rank == 0:
        layout.stage_dir(index).mkdir(parents=True, exist_ok=True)
        layout.deepspeed_config_file.write_text(json.dumps(ds_config, indent=2))

    batches = TrainBatches(
        run.train_data, config.data, collator, config.training.micro_batch_size, rank, world, config.seed + index
    )
    stamp = fingerprint(
        {
            "model": dataclasses.asdict(config.model),
            "tasks": [t.name for t in config.tasks],
            "mta": dataclasses.asdict(config.mta),
            "stage": dataclasses.asdict(stage),
            "global_batch": config.training.micro_batch_size * config.training.gradient_accumulation_steps * world,
        }
    )
    step = 0
    step_seconds = 0.0  # time in optimizer steps, summed over every run of the stage (a resume carries it on)
    if saved is not None:
        state = load_checkpoint(engine, checkpoints, saved, stamp)
        step = int(state["step"])
        step_seconds = float(state.get("step_seconds", 0.0))
        batches.load_state_dict(state["sampler"])
        if rank == 0:
            print(f"resumed stage {stage.name} from step {step} ({checkpoints})")

    def checkpoint() -> None:
        client = {
            "step": step,
            "sampler": batches.state_dict(),
            "fingerprint": stamp,
            "stage": stage.name,
            "step_seconds": step_seconds,
        }
        save_checkpoint(engine, checkpoints, f"step{step}", client, config.training.keep_checkpoints)

    if index == 0 and step == 0 and stage.init_from is None and config.training.eval_backbone:
        run.backbone_results = _evaluate(model, run, config, "backbone", 0)

    from tqdm import tqdm

    progress = tqdm(total=stage.steps, initial=step, desc=stage.name, disable=rank != 0, dynamic_ncols=True)
    accumulation = config.training.gradient_accumulation_steps
    window = _LogWindow.empty(len(config.tasks), engine.device)
    nonfinite_in_a_row, nonfinite_total = 0, 0
    engine.train()
    while step < stage.steps:
        # The one vote of the step: a signal may reach one rank first, and every rank must stop at the same step.
        if _any_rank(run.stop.requested, engine.device):
            checkpoint()
            if rank == 0:
                reason = run.stop.signal_name or "stop"
                print(f"\n{reason} received: checkpointed stage {stage.name} at step {step}; exiting")
            raise SystemExit(0)
        started = time.perf_counter()
        model.set_step(step)
        result = train_step(engine, model, batches, accumulation, len(config.tasks), run.seq2seq)
        if not result.applied:
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            logger.scalars({"train/nonfinite_skipped": nonfinite_total}, step)
            if nonfinite_in_a_row >= config.training.max_nonfinite_steps:
                checkpoint()
                raise TrainingError(
                    f"stage {stage.name}: {nonfinite_in_a_row} steps in a row with a non-finite loss or gradient "
                    f"at step {step}, each skipped; checkpointed. Lower the learning rate or check the data, "
                    f"then resume."
                )
            continue
        nonfinite_in_a_row = 0
        window.add(result.loss_sums, result.tokens, result.samples, result.lr)
        step += 1
        step_seconds += time.perf_counter() - started
        progress.update(1)
        if step % config.training.log_every == 0 or step == stage.steps:
            _log_window(engine, model, logger, window, step, index, config, progress, layout.metrics_file(index))
        if step % config.training.checkpoint_every == 0 and step < stage.steps:
            checkpoint()
        if config.training.eval_every and step % config.training.eval_every == 0 and step < stage.steps:
            _evaluate(model, run, config, f"{stage.name}_step{step}", step)
    progress.close()
    checkpoint()
    results = _evaluate(model, run, config, stage.name, step)
    summary = {
        "stage": stage.name,
        "steps": step,
        "parameters": {group: {"trainable": t, "total": n} for group, (t, n) in counts.items()},
        "train_seconds": round(step_seconds, 3),  # in optimizer steps (skipped ones not counted), over resumes
        "mean_step_seconds": step_seconds / step if step else None,
        "nonfinite_skipped": nonfinite_total,
        "dev": results,
    }
    if rank == 0:
        _module_fp32(engine, model).save_pretrained(layout.model_dir(index))
        layout.summary_file(index).write_text(json.dumps(summary, indent=2))
    else:
        _module_fp32(engine, model)
    dist.barrier()
    return summary


def _keep_global_batch(config: ExperimentConfig, saved_world: int, world: int, rank: int) -> ExperimentConfig:
    """Resuming on another number of ranks: change gradient accumulation so every optimizer step still sees
    the same global batch (the sampler's stream is the same; only how it is cut into micro-batches changes)."""
    training = config.training
    total = training.micro_batch_size * training.gradient_accumulation_steps * saved_world
    if total % (training.micro_batch_size * world):
        raise TrainingError(
            f"the checkpoint was written by {saved_world} ranks with a global batch of {total}; "
            f"{world} ranks of micro_batch_size {training.micro_batch_size} cannot make that batch"
        )
    accumulation = total // (training.micro_batch_size * world)
    if rank == 0:
        print(f"resuming a {saved_world}-rank checkpoint on {world} rank(s): gradient accumulation {accumulation}")
    return dataclasses.replace(config, training=dataclasses.replace(training, gradient_accumulation_steps=accumulation))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether the flag is set on any rank (a collective, on the engine's device: NCCL has no CPU tensors)."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _module_fp32(engine: Any, model: MTAModel) -> MTAModel:
    """Trainable weights at full precision: under bf16 the module holds a bf16 copy, the fp32 masters live in
    the ZeRO partitions (a collective: every rank calls this)."""
    if not engine.bfloat16_enabled():
        return model
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {id(p): safe_get_full_fp32_param(p) for p in model.parameters() if p.requires_grad}
    model = model.float()
    with torch.no_grad():
        for parameter in model.parameters():
            if id(parameter) in masters and masters[id(parameter)] is not None:
                parameter.copy_(masters[id(parameter)])
    return model


@dataclasses.dataclass
class _LogWindow:
    """What the steps since the last log line added up, kept on the device until it is logged."""

    loss: torch.Tensor  # [2, tasks]: summed token loss, token count
    tokens: int
    samples: int
    lr: float
    started: float

    @classmethod
    def empty(cls, num_tasks: int, device: torch.device) -> _LogWindow:
        return cls(torch.zeros(2, num_tasks, device=device), 0, 0, 0.0, time.perf_counter())

    def add(self, sums: torch.Tensor, tokens: int, samples: int, lr: float) -> None:
        self.loss += sums
        self.tokens += tokens
        self.samples += samples
        self.lr = lr


def _log_window(
    engine: Any,
    model: MTAModel,
    logger: RunLogger,
    window: _LogWindow,
    step: int,
    index: int,
    config: ExperimentConfig,
    progress: Any,
    metrics_file: Path,
) -> None:
    import torch.distributed as dist

    totals = window.loss.clone()
    counters = torch.tensor([float(window.tokens), float(window.samples)], device=totals.device)
    if dist.is_initialized():
        dist.all_reduce(totals)
        dist.all_reduce(counters)
    totals, counters = totals.cpu(), counters.cpu()
    usage = _gathered_usage(model, engine.device)
    seconds = max(time.perf_counter() - window.started, 1e-9)
    loss = float(totals[0].sum() / totals[1].sum().clamp_min(1))
    values = {
        "train/loss": loss,
        "train/lr": window.lr,
        "train/tokens_per_s": float(counters[0]) / seconds,
        "train/samples_per_s": float(counters[1]) / seconds,
        "train/stage": float(index + 1),
    }
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    for task_id, task in enumerate(config.tasks):
        if totals[1, task_id] > 0:
            values[f"train_loss/{task.name}"] = float(totals[0, task_id] / totals[1, task_id])
    prefix = config.stages[index].name
    logger.scalars({f"{prefix}/{key}": value for key, value in values.items()}, step)
    if logger.rank == 0:  # the same numbers as plain lines, for scripts (a resumed run appends)
        with metrics_file.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
    logger.routing(usage, step, f"{prefix}/routing")
    logger.flush()
    progress.set_postfix(loss=f"{loss:.4f}")
    window.loss.zero_()
    window.tokens = window.samples = 0
    window.started = time.perf_counter()


def _gathered_usage(model: MTAModel, device: torch.device) -> dict[str, torch.Tensor]:
    """Each block's mean routing per task since the last call, averaged over ranks (a collective, on the
    engine's device); returned on the CPU."""
    import torch.distributed as dist

    usage = {name: block.usage().to(device) for name, block in model.blocks.items()}
    if dist.is_initialized():
        for matrix in usage.values():
            dist.all_reduce(matrix)
        usage = {name: matrix / dist.get_world_size() for name, matrix in usage.items()}
    return {name: matrix.cpu() for name, matrix in usage.items()}


def _evaluate(model: MTAModel, run: RunContext, config: ExperimentConfig, name: str, step: int) -> dict[str, Any]:
    _gathered_usage(model, run.device)  # drop training usage: the heatmap below shows routing on the dev set
    results = evaluate(
        model,
        run.tokenizer,
        config.tasks,
        run.dev,
        run.seq2seq,
        config.training.eval_batch_size,
        config.training.eval_max_examples,
    )
    usage = _gathered_usage(model, run.device)
    run.logger.routing(usage, step, f"eval/{name}", heatmap=True, save_to=run.layout.routing_file(name))
    if run.rank == 0:
        run.logger.scalars({f"eval/{t}/{r['metric']}": r["score"] for t, r in results.items()}, step)
        out = run.layout.eval_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}_dev.json").write_text(json.dumps(results, indent=2))
        print(f"\n{name} (dev)\n" + format_results({name: results}))
    return results


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config: ExperimentConfig = load_config(args.config)
    if args.output_dir:
        config.training.output_dir = args.output_dir
    if args.run_name:
        config.run_name = args.run_name
        config.validate()
    rank, world, accelerator = init_distributed()
    quiet_libraries(rank)
    layout = RunLayout.of(config)
    stages = layout.select(args.stage)
    if rank == 0:
        layout.root.mkdir(parents=True, exist_ok=True)
        save_config(config, layout.config_file)
    tokenizer = load_tokenizer(config.model)
    seq2seq = is_seq2seq(config.model)
    run = RunContext(
        layout=layout,
        rank=rank,
        world=world,
        accelerator=accelerator,
        device=_rank_device(),
        tokenizer=tokenizer,
        seq2seq=seq2seq,
        stop=StopRequest().install(),
        train_data=MultiTaskData.load(config.tasks, tokenizer, seq2seq, "train", config.data.root, config.seed),
        dev=split_examples(config.tasks, "dev", config.data.root, config.seed),
        logger=RunLogger(layout.tensorboard_dir, rank, config.task_names()),
        resume=args.resume == "auto",
    )
    summaries = [train_stage(config, index, run) for index in stages]
    run.logger.close()
    if rank == 0:
        columns = {"backbone": run.backbone_results} if run.backbone_results is not None else {}
        columns.update({s["stage"]: s["dev"] for s in summaries})
        print("\nper-task dev metrics\n" + format_results(columns, delta=True))
        print(f"\nTensorBoard: tensorboard --logdir {layout.tensorboard_dir}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """``main`` with the errors a person can act on (``AlterDsError``: a bad config, a stage that cannot
    start, an unusable checkpoint) reported as one line and exit status 2 on every rank; bugs keep their
    tracebacks."""
    try:
        return main(argv)
    except AlterDsError as error:
        print(f"alter-ds train: {error}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter exits: left to interpreter teardown, its backend's
    threads can be destroyed while joinable, and a rank then aborts ("terminate called without an active
    exception", exit -6) after it has already decided its exit status (seen once in CI on the exit-2 path)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run())
