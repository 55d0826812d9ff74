"""alter-ds's LoRA experts side by side with PEFT: one training step on mixed-task batches.

The same backbone (SmolLM2-135M's architecture, random weights), the same tokens (a batch of B sequences
whose examples are spread evenly over T tasks), LoRA of rank r on the same projections of every layer,
AdamW over what trains. Per step (forward, backward, optimizer):
  alter-ds     one LoRA expert per task (kind ``lora``, hard routing by task id): the mixed batch in one pass;
  peft-multi   PEFT with one LoRA adapter per task. PEFT refuses per-example adapters in training mode
               (``adapter_names`` is inference-only), so one sub-batch per task with ``set_adapter``, their
               gradients accumulated, then one optimizer step;
  peft-single  PEFT with one LoRA shared by every task: the lower bound (no per-task parameters at all).

    python benchmarks/bench_peers.py --tasks 4 16 64 --reps 3

Each setting runs in a fresh process, so its peak memory (RSS on CPU, the allocator's peak on a GPU) is its
own. Ratios are of medians from one invocation on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_mta_step import _Bound, peak_mb, smollm2_like, synchronize
from isolated import run_case

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig
from alter_ds.mta import MTAModel

SETTINGS = ("alter-ds", "peft-multi", "peft-single")
#: the alias alter-ds's lora_targets take and the module name PEFT's target_modules take, for Llama
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj"}  # fmt: skip


def build(setting: str, tasks: int, args: argparse.Namespace) -> tuple[torch.nn.Module, list[str]]:
    """The model of one setting and the adapter (or task) name of each example of the batch."""
    backbone = smollm2_like(args.layers)
    names = [f"task{i}" for i in range(tasks)]
    per_example = [names[i % tasks] for i in range(args.batch)]
    if setting == "alter-ds":
        config = MTAConfig(
            expert_kind="lora", lora_targets=list(args.targets), bottleneck_dim=args.rank, lora_alpha=2.0 * args.rank
        )
        model = MTAModel(backbone, config, [TaskConfig(n) for n in names], RouterConfig(kind="hard"))
        model.set_trainable(["task_experts"])
        return _Bound(model, torch.arange(args.batch) % tasks), per_example
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=[PROJECTIONS[t] for t in args.targets]
    )
    adapters = names if setting == "peft-multi" else ["shared"]
    peft_model = get_peft_model(backbone, lora, adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.add_adapter(name, lora)
    return peft_model, per_example if setting == "peft-multi" else ["shared"] * args.batch


def sub_batches(batch: dict, per_example: list[str]) -> list[tuple[str, dict, float]]:
    """(adapter, its examples, their share of the batch) for each adapter, in order of first appearance."""
    out = []
    for name in dict.fromkeys(per_example):
        index = torch.tensor([i for i, n in enumerate(per_example) if n == name])
        out.append((name, {k: v[index] for k, v in batch.items()}, len(index) / len(per_example)))
    return out


def measure(setting: str, tasks: int, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 1000, (args.batch, args.length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    batch = {key: value.to(args.device) for key, value in batch.items()}
    model, per_example = build(setting, tasks, args)
    model = model.to(args.device).train()
    if setting == "alter-ds":
        parts = [(None, batch, 1.0)]
    else:
        parts = sub_batches(batch, per_example)
        for name, _, _ in parts:  # every adapter trains; set_adapter would freeze the others
            for key, parameter in model.named_parameters():
                if f".{name}." in key:
                    parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loaded = peak_mb(args.device)
    times = []
    for rep in range(args.warmup + args.reps):
        optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        start = time.perf_counter()
        for name, part, share in parts:
            if name is not None and len(parts) > 1:
                model.set_adapter(name)  # type: ignore[operator]
            (model(**part).loss * share).backward()
        optimizer.step()
        synchronize(args.device)
        if rep >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return {
        "setting": setting,
        "tasks": tasks,
        "median_s": times[len(times) // 2],
        "min_s": times[0],
        "max_s": times[-1],
        "peak_mb": peak_mb(args.device),
        "step_memory_mb": peak_mb(args.device) - loaded,
        "trainable": sum(p.numel() for p in trainable),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--targets", nargs="+", default=list(PROJECTIONS), choices=list(PROJECTIONS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="sequences per step (a multiple of every T)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    bad = [t for t in args.tasks if args.batch % t]
    if bad:
        raise SystemExit(f"--batch {args.batch} is not a multiple of T = {bad}: every task needs its examples")
    rows = []
    for tasks in args.tasks:
        for setting in SETTINGS:
            rows.append(run_case(__file__, [setting, str(tasks)]))
            print(f"  {setting} T={tasks}: {rows[-1]['median_s']:.2f} s", file=sys.stderr, flush=True)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}")
    print(
        f"batch {args.batch} x {args.length} tokens, LoRA r={args.rank} on {','.join(args.targets)} of "
        f"{args.layers} layers, step = forward + backward + AdamW, median of {args.reps} after {args.warmup} warmup"
    )
    print(
        f"{'T':>4}{'setting':>13}{'median s':>10}{'min':>8}{'max':>8}{'peak MB':>9}{'trainable':>12}"
        f"{'peft-multi / alter-ds':>23}{'alter-ds / peft-single':>24}"
    )
    for row in rows:
        same = {r["setting"]: r for r in rows if r["tasks"] == row["tasks"]}
        ratios = ""
        if row["setting"] == "alter-ds":
            speed = same["peft-multi"]["median_s"] / row["median_s"]
            bound = row["median_s"] / same["peft-single"]["median_s"]
            ratios = f"{speed:>22.2f}x{bound:>23.2f}x"
        print(
            f"{row['tasks']:>4}{row['setting']:>13}{row['median_s']:>10.2f}{row['min_s']:>8.2f}{row['max_s']:>8.2f}"
            f"{row['peak_mb']:>9.0f}{row['trainable']:>12,}{ratios}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
