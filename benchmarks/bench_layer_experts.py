"""What layer experts cost per copy: training step, inference forward, parameters and memory.

Layer experts replace each chosen layer by m routed copies of it. Training mixes every copy densely (each
example runs all m), so a step costs about m times the chosen layers' share of the model; inference runs
only the copy an example routes to, so it costs about what the backbone does. This measures both, for m =
1, 2, 3 copies of the chosen layers, against the backbone with the same layers trainable (fine-tuning them):

    python benchmarks/bench_layer_experts.py --copies 1 2 3 --expert-layers all --reps 3

Settings run in fresh processes (peak RSS is each one's own). The model is SmolLM2-135M's architecture with
random weights (see bench_mta_step.py); the router is the task-level MoE's (task embeddings, straight-through
Gumbel), the batch mixes 4 tasks. "training state" counts 16 bytes per trainable parameter (fp32 weight,
gradient, Adam's two moments); the copies' frozen pretrained layer is held once more on the host.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from bench_mta_step import _Bound, peak_mb, smollm2_like, time_steps
from isolated import run_case

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig
from alter_ds.mta import MTAModel

TASKS = 4


def chosen_layers(spec: str, total: int) -> list[int]:
    """all, or upperN (the top N layers)."""
    if spec == "all":
        return list(range(total))
    if spec.startswith("upper") and spec[5:].isdigit():
        return list(range(total - int(spec[5:]), total))
    raise SystemExit(f"--expert-layers: all or upperN, not {spec!r}")


def build(copies: int, args: argparse.Namespace) -> torch.nn.Module:
    layers = chosen_layers(args.expert_layers, args.layers)
    backbone = smollm2_like(args.layers)
    if copies == 0:  # the reference: the same layers fine-tuned in place
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        for index in layers:
            for parameter in backbone.model.layers[index].parameters():
                parameter.requires_grad_(True)
        return backbone
    router = RouterConfig(kind="task_embedding", mode="st_gumbel", temperature=2.0, task_embedding_dim=64)
    config = MTAConfig(expert_kind="layer", num_task_experts=copies, layers=layers)
    model = MTAModel(backbone, config, [TaskConfig(f"task{i}") for i in range(TASKS)], router)
    model.set_trainable(["task_experts", "router", "task_embeddings"])
    return _Bound(model, torch.arange(args.batch) % TASKS)


def measure(copies: int, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 1000, (args.batch, args.length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    model = build(copies, args).train()
    loaded = peak_mb("cpu")
    result = {"copies": copies, **time_steps(model, batch, args.reps, "cpu")}
    result["train_peak_rss_mb"] = peak_mb("cpu")
    result["train_step_memory_mb"] = result["train_peak_rss_mb"] - loaded
    model.eval()
    times = []
    with torch.no_grad():
        for rep in range(1 + args.reps):
            start = time.perf_counter()
            model(**batch)
            if rep:
                times.append(time.perf_counter() - start)
    result["inference_median_s"] = sorted(times)[len(times) // 2]
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--expert-layers", default="all", help="all, or upperN (the top N layers)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args)))
        return
    rows = [run_case(__file__, [str(copies)]) for copies in [0, *args.copies]]
    reference = rows[0]
    layers = chosen_layers(args.expert_layers, args.layers)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; SmolLM2-135M shape, {len(layers)} of {args.layers} layers with experts, "
          f"batch {args.batch} x {args.length} tokens, {TASKS} tasks, median of {args.reps}")  # fmt: skip
    print(f"{'setting':<22}{'train step s':>13}{'x ref':>7}{'infer s':>9}{'x ref':>7}{'params M':>10}"
          f"{'trainable M':>13}{'train state MB':>16}{'peak RSS MB':>13}")  # fmt: skip
    for row in rows:
        name = (
            "layers fine-tuned" if row["copies"] == 0 else f"{row['copies']} cop{'y' if row['copies'] == 1 else 'ies'}"
        )
        print(
            f"{name:<22}{row['median_s']:>13.3f}{row['median_s'] / reference['median_s']:>7.2f}"
            f"{row['inference_median_s']:>9.3f}{row['inference_median_s'] / reference['inference_median_s']:>7.2f}"
            f"{row['parameters'] / 1e6:>10.1f}{row['trainable_parameters'] / 1e6:>13.1f}"
            f"{16 * row['trainable_parameters'] / 2**20:>16.0f}{row['train_peak_rss_mb']:>13.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
