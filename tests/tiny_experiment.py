"""A whole tiny experiment on disk (random tied Llama, synthetic tasks, two stages) for the trainer's
end-to-end tests: through the DeepSpeed launcher (test_train) and through Slurm (slurm/test_slurm)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from tiny_models import tiny_backbone, tiny_tokenizer

from alter_ds.data.synthetic import synthetic_tasks


def task_specs(families: list[str]) -> list[dict]:
    """The YAML task entries of synthetic task families."""
    fields = ("name", "category", "builder", "template", "target_field", "labels", "metric")
    return [{k: v for k, v in dataclasses.asdict(t).items() if k in fields} for t in synthetic_tasks(families)]


def write_tiny_experiment(root: Path, stage1_steps: int, stage2_steps: int = 10, checkpoint_every: int = 10) -> Path:
    """Write the backbone to ``root/tiny-llama`` and the experiment to ``root/cfg.yaml``; return the config."""
    backbone = tiny_backbone("llama", tie_word_embeddings=True)  # tied like SmolLM2: checkpoints must drop both
    with torch.no_grad():  # a wider output layer than the 0.02 init lets adapters move the logits within 60 steps
        backbone.lm_head.weight.mul_(20)
    backbone.save_pretrained(root / "tiny-llama")
    tiny_tokenizer().save_pretrained(root / "tiny-llama")
    tasks = task_specs(["string", "rule"])
    for task in tasks:
        task["max_examples"] = {"dev": 8}
    config = {
        "run_name": "tiny",
        "model": {"name_or_path": str(root / "tiny-llama")},
        "tasks": tasks,
        "mta": {"expert_kind": "bottleneck", "bottleneck_dim": 8, "num_shared_experts": 1},
        "training": {
            "micro_batch_size": 4,
            "log_every": 1,
            "checkpoint_every": checkpoint_every,
            "warmup_steps": 2,
            "keep_checkpoints": 3,
        },
        "stages": [
            {
                "name": "stage1",
                "router": {"kind": "hard"},
                "train": ["task_experts", "shared_experts"],
                "lr": 3e-2,
                "steps": stage1_steps,
            },
            {
                "name": "stage2",
                "init_from": "stage1",
                "train": ["router"],
                "lr": 5e-2,
                "steps": stage2_steps,
                "router": {"kind": "task_weights", "prior_assigned": 4.0, "prior_other": 0.0},
            },
        ],
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
