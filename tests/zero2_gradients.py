"""Run under the DeepSpeed launcher with 2 ranks: one ZeRO-2 step of a tiny MTA model whose ranks see different
tasks (task 0 only on rank 0; tasks 1 and 2 only on rank 1). Each rank writes the largest difference between its
updated parameters and a single-process computation of the same step. Used by tests/test_zero2_experts.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import batch_inputs, make_model

from alter_ds.config import RouterConfig

LR = 0.5
RANK_TASKS = {0: [0, 0], 1: [1, 2]}


def loss_for(model, inputs, tasks):
    return model(**inputs, labels=inputs["input_ids"], task_ids=tasks).loss


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--router", default="hard", choices=["hard", "task_embedding"])
    parser.add_argument("--experts", default="bottleneck", choices=["bottleneck", "layer", "lora"])
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)

    # task_embedding: one table shared by every layer's router MLP, whose rows of tasks absent on a rank get
    # gradient from the other rank only
    router = RouterConfig(kind=args.router, task_embedding_dim=8 if args.router == "task_embedding" else 0)
    if args.experts == "layer":  # three copies of every layer, all run on every rank (dense mixing)
        model = make_model("gpt2", "layer", router, shared=0, perturb=0.3, num_task_experts=3)
    elif args.experts == "lora":  # stacked A and B beside the fused qkv, attention output and FFN projections
        model = make_model("gpt2", "lora", router, shared=1, perturb=0.3, lora_targets=["c_attn", "o", "up", "down"])
    else:
        model = make_model("gpt2", "bottleneck", router, shared=1, perturb=0.3)
    model.set_trainable(["task_experts", "shared_experts", "router", "task_embeddings"])
    inputs = batch_inputs(model, batch=4)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    halves = {r: {k: v[2 * r : 2 * r + 2] for k, v in inputs.items()} for r in range(world)}

    # single-process reference: the mean of the two ranks' losses, one SGD step
    reference = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = sum(loss_for(model, halves[r], RANK_TASKS[r]) for r in range(world)) / world
    total.backward()
    expected = {name: reference[name] - LR * p.grad for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # plain SGD makes the expected update exact: p - lr * grad
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    loss = loss_for(engine, halves[rank], RANK_TASKS[rank])
    engine.backward(loss)
    engine.step()
    worst = max(
        float((p.detach() - expected[name]).abs().max())
        for name, p in engine.module.named_parameters()
        if name in expected
    )
    moved = max(float((expected[name] - reference[name]).abs().max()) for name in expected)
    Path(args.out, f"rank{rank}.json").write_text(
        json.dumps({"max_abs_diff": worst, "max_update": moved, "world": world, "trained": sorted(expected)})
    )


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
