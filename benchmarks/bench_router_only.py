"""What a router-only stage (experts frozen) no longer computes: expert-weight gradients in the op's backward,
and the concatenation of task and shared experts on every forward.

Both "before" figures are measured, not remembered: the op's backward with ``weight_grads=True`` is what every
backward computed before it read ``ctx.needs_input_grad``, and ``stacked_weights`` called afresh is what
every forward did before the stack was kept.

    python benchmarks/bench_router_only.py --reps 20

Shapes: N tokens of width d = 576 (SmolLM2-135M), mixed-task routing with k = 2 (the task's expert and a shared
one); bottleneck adapters r = 16 for 8 tasks + 1 shared expert, and SwiGLU FFN copies (r = 1536) for 2 tasks + 1
shared expert (the alter-paper layout).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from alter_ds.mta.experts import ExpertBank, stacked_weights
from alter_ds.ops.build import load_extension

SHAPES = {
    "adapters r=16, 9 experts": dict(rank=16, experts=8, shared=1, activation="relu"),
    "FFN copies r=1536 (SwiGLU), 3 experts": dict(rank=1536, experts=2, shared=1, activation="swiglu"),
}


def median_seconds(function: Callable[[], object], reps: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not load_extension():
        raise SystemExit("the C++ extension did not build (see the warning above)")
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"N = {args.tokens} tokens, d = {args.width}, k = 2, median of {args.reps}\n")
    print(
        "| experts | op backward, all gradients (before) | router-only (after) | after / before |"
        " stack per forward (before) | kept (after) |"
    )
    print("|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        print(measure(label, shape, args.tokens, args.width, args.reps))


def measure(label: str, shape: dict[str, Any], tokens: int, width: int, reps: int) -> str:
    """One table row: the op's backward with and without weight gradients, and the cost of re-stacking."""
    op = torch.ops.alter_ds
    banks = [
        ExpertBank(shape["experts"], width, shape["rank"], shape["activation"]),
        ExpertBank(shape["shared"], width, shape["rank"], shape["activation"]),
    ]
    for bank in banks:
        bank.random_perturb(0.3, torch.Generator().manual_seed(1))
        bank.requires_grad_(False)
    w_down, b_down, w_up, b_up = stacked_weights(banks)
    experts = w_down.shape[0]
    x = torch.randn(tokens, width)
    ids = torch.stack([torch.randint(0, experts - 1, (tokens,)), torch.full((tokens,), experts - 1)], 1)
    mix = torch.rand(tokens, 2)
    activation = shape["activation"]
    y, hidden = op.grouped_adapter(x, ids, mix, w_down, b_down, w_up, b_up, activation)
    grad_y = torch.randn_like(y)
    backward_args = (grad_y, x, ids, mix, w_down, b_down, w_up, b_up, hidden, activation)
    full = median_seconds(lambda: op.grouped_adapter_backward(*backward_args, True), reps)
    router_only = median_seconds(lambda: op.grouped_adapter_backward(*backward_args, False), reps)
    restack = median_seconds(lambda: stacked_weights(banks), reps)
    mib = sum(t.numel() for t in (w_down, b_down, w_up, b_up) if t is not None) * 4 / 2**20
    return (
        f"| {label} | {full * 1e3:.2f} ms | {router_only * 1e3:.2f} ms | {router_only / full:.2f} |"
        f" {restack * 1e3:.3f} ms ({mib:.1f} MiB) | 0 |"
    )


if __name__ == "__main__":
    main()
