"""What the MTA module costs in a training step, and how small its checkpoints are.

For T tasks (one bottleneck expert per task, r=16, after the FFN of every layer, hard routing, mixed-task
batches) this measures forward+backward time and peak RSS growth of:
  backbone   the backbone alone, every weight trainable (the reference step);
  mta+bb     the same with the MTA module injected, backbone still trainable (pure MTA overhead);
  mta        the stage-1 step: backbone frozen, experts trainable (what alter-ds actually runs).
It also writes the trainable state of the `mta` setting and the whole model with safetensors and reports
their size ratio (what `exclude_frozen_parameters` checkpoints save).

    python benchmarks/bench_mta_step.py --tasks 4 16 64 --reps 5

The default model is SmolLM2-135M's architecture (d=576, 30 layers) from its config with random weights, so
no download is needed; `--model DIR` takes any local Hugging Face causal LM.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from isolated import run_case
from safetensors.torch import save_file

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig
from alter_ds.mta import MTAModel


def smollm2_like(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def load(model_dir: str | None, layers: int) -> torch.nn.Module:
    if model_dir is None:
        return smollm2_like(layers)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb(device: str) -> float:
    """Peak memory so far: the process's RSS on CPU, the allocator's peak on a GPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mb()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model: torch.nn.Module, batch: dict, reps: int, device: str, warmup: int = 1) -> dict:
    """Median/p20/p80 seconds of forward+backward (no optimizer: identical for every setting)."""
    times = []
    for rep in range(warmup + reps):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if rep >= warmup:
            times.append(elapsed)
    times.sort()
    return {
        "median_s": statistics.median(times),
        "p20_s": times[int(0.2 * (len(times) - 1))],
        "p80_s": times[int(0.8 * (len(times) - 1))],
    }


def measure(setting: str, tasks: int, args: argparse.Namespace) -> dict:
    """One setting in this process (the caller runs each in a fresh one, so peak RSS is its own)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 1000, (args.batch, args.length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    batch = {key: value.to(args.device) for key, value in batch.items()}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if setting == "backbone":
        model: torch.nn.Module = load(args.model, args.layers).train()
    else:
        task_table = [TaskConfig(f"task{i}") for i in range(tasks)]
        mta = MTAModel(
            load(args.model, args.layers), MTAConfig(bottleneck_dim=args.rank), task_table, RouterConfig(kind="hard")
        ).train()
        mta.set_trainable(["backbone", "task_experts"] if setting == "mta+bb" else ["task_experts"])
        with torch.no_grad():  # non-zero up projections, as after some training
            for block in mta.blocks.values():
                block.task_experts.w_up.normal_(0, 0.01)
        model = _Bound(mta, torch.arange(args.batch) % tasks)
    model = model.to(device=args.device, dtype=dtype)
    loaded = peak_mb(args.device)
    result = {"setting": setting, "tasks": tasks, **time_steps(model, batch, args.reps, args.device)}
    result["peak_rss_mb"] = peak_mb(args.device)
    result["step_memory_mb"] = peak_mb(args.device) - loaded
    if setting == "mta":
        with tempfile.TemporaryDirectory() as scratch:
            trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, f"{scratch}/trainable.safetensors")
            everything = {n: p.detach().clone().contiguous() for n, p in model.state_dict().items()}
            save_file(everything, f"{scratch}/model.safetensors")
            result["checkpoint_bytes"] = Path(f"{scratch}/trainable.safetensors").stat().st_size
            result["model_bytes"] = Path(f"{scratch}/model.safetensors").stat().st_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 is ~20x slower on CPUs")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    runs = [("backbone", 0)] + [(setting, t) for t in args.tasks for setting in ("mta+bb", "mta")]
    rows = [run_case(__file__, [setting, str(tasks)]) for setting, tasks in runs]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"batch {args.batch} x {args.length} tokens, r={args.rank}, layers={args.layers}, reps={args.reps}")
    print(f"device {args.device}, {args.dtype}; peak memory is {'GPU allocator' if args.device == 'cuda' else 'RSS'}")
    print(
        f"{'setting':<10}{'T':>4}{'median s':>10}{'p20':>8}{'p80':>8}{'x backbone':>12}{'peak RSS MB':>13}"
        f"{'x backbone':>12}{'ckpt/model':>12}"
    )
    for row in rows:
        ratio = row["median_s"] / rows[0]["median_s"]
        memory = row["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        size = f"{row['checkpoint_bytes'] / row['model_bytes']:.4f}" if "checkpoint_bytes" in row else ""
        print(
            f"{row['setting']:<10}{row['tasks']:>4}{row['median_s']:>10.3f}{row['p20_s']:>8.3f}{row['p80_s']:>8.3f}"
            f"{ratio:>12.3f}{row['peak_rss_mb']:>13.0f}{memory:>12.3f}{size:>12}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


class _Bound(torch.nn.Module):
    """The MTA model with the batch's task ids bound, so every setting is timed by the same function."""

    def __init__(self, model: MTAModel, task_ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.task_ids = task_ids

    def forward(self, **batch):
        return self.model(**batch, task_ids=self.task_ids)


if __name__ == "__main__":
    main()
