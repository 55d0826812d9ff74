"""What projecting only the target positions onto the vocabulary saves in a training step.

The trainer's loss needs the logits of the positions that predict a target token; a decoder-only backbone
that takes ``logits_to_keep`` computes only those (``alter_ds.data.collate.target_logit_positions``). This
times ``alter_ds.train.micro_batch_loss`` forward and backward both ways, alternating them rep by rep in one
process, for two arms of the CPU study:

  adapters   bottleneck experts (r = 16) after the FFN of the upper 10 of 30 layers, backbone frozen;
  full       every backbone weight trainable, no experts.

    python benchmarks/bench_target_logits.py --reps 5

Batches are the study's micro-batches in shape: 4 right-padded rows of prompts of 40-96 tokens; 3 rows are
classification (a 2-token label and eos) and one is a generation task (a 24-token target). The model is
SmolLM2-135M's architecture from its config, random weights (``--model DIR`` for a local checkpoint).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from bench_mta_step import load

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig
from alter_ds.data.collate import IGNORE_INDEX, MultiTaskCollator, TokenizedExample
from alter_ds.mta import MTAModel
from alter_ds.train import micro_batch_loss

ROWS = [(96, 3), (71, 3), (40, 3), (58, 25)]  # (prompt tokens, target tokens incl. eos) per row


def study_batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for task, (prompt, target) in enumerate(ROWS):
        ids = torch.randint(5, vocab, (prompt + target,), generator=generator).tolist()
        examples.append(TokenizedExample(task, ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    return MultiTaskCollator(0, seq2seq=False)(examples)


def build(arm: str, args: argparse.Namespace) -> MTAModel:
    layers = list(range(args.layers - 10, args.layers)) if arm == "adapters" else "none"
    tasks = [TaskConfig(f"task{i}") for i in range(len(ROWS))]
    model = MTAModel(load(args.model, args.layers), MTAConfig(layers=layers), tasks, RouterConfig(kind="hard"))
    model.set_trainable(["task_experts"] if arm == "adapters" else ["backbone"])
    return model.train()


def step_seconds(model: MTAModel, batch: dict[str, torch.Tensor], keep: bool) -> float:
    accepts = model.backbone_accepts
    if not keep:  # as for a backbone without logits_to_keep
        model.backbone_accepts = lambda argument: argument != "logits_to_keep"  # type: ignore[method-assign]
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss, _ = micro_batch_loss(model, model, dict(batch), len(ROWS), seq2seq=False)
    loss.backward()
    elapsed = time.perf_counter() - started
    model.backbone_accepts = accepts  # type: ignore[method-assign]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"micro-batch rows (prompt, target tokens): {ROWS}")
    print(f"{'arm':<10}{'full logits s':>15}{'targets only s':>16}{'ratio':>8}")
    for arm in ("adapters", "full"):
        model = build(arm, args)
        batch = study_batch(model.config.vocab_size)
        step_seconds(model, batch, keep=True)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.reps):
            for keep in (False, True):
                times[keep].append(step_seconds(model, batch, keep))
        full, kept = statistics.median(times[False]), statistics.median(times[True])
        print(f"{arm:<10}{full:>15.3f}{kept:>16.3f}{kept / full:>8.3f}")


if __name__ == "__main__":
    main()
