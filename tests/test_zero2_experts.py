"""Stacked expert weights under DeepSpeed ZeRO-2 with ranks that route differently (real launcher, 2 ranks).

Experts held as separate parameters get silently wrong gradients here (ZeRO reduces gradient buckets by
position in hook order); stacked banks must match a single-process step exactly (fp32, 1e-6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize(
    "implementation, router, experts, port",
    [
        ("reference", "hard", "bottleneck", 29517),
        ("cpp", "hard", "bottleneck", 29519),
        ("cpp", "task_embedding", "bottleneck", 29521),
        ("reference", "hard", "layer", 29523),  # hard: rank 0 routes to copy 0 only, rank 1 to copies 1 and 2
        ("reference", "hard", "lora", 29525),
        ("cpp", "hard", "lora", 29527),  # the compiled kernel on the widening qkv and the other projections
        ("auto", "hard", "lora", 29529),  # what runs by default: per-example routes through batched matmuls
    ],
)
def test_zero2_step_with_tasks_missing_on_each_rank_matches_single_process(
    tmp_path, implementation, router, experts, port
):
    """``cpp`` forces the compiled op (an error if it is not built), ``reference`` the PyTorch one;
    ``task_embedding`` routes through the model's one task table and each layer's MLP, all of them trained;
    ``layer`` holds three copies of each layer as separate modules, which dense mixing keeps correct; ``lora``
    stacks each projection's A and B (the fused qkv widens: 3d out of d in)."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is installed with the package"
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(HERE.parent),
        ALTER_DS_GROUPED_ADAPTER=implementation,
    )
    command = [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(HERE / "zero2_gradients.py"),
        "--out",
        str(tmp_path),
        "--router",
        router,
        "--experts",
        experts,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["world"] == 2
        assert report["max_update"] > 1e-3  # the step really moved the experts
        assert report["max_abs_diff"] < 1e-6
        if router == "task_embedding":
            assert "task_embeddings.weight" in report["trained"]
            assert any(".router.mlp." in name for name in report["trained"])
        if experts == "lora":  # every projection's B trains, the fused qkv's included
            assert sum(name.endswith(".task_experts.w_up") for name in report["trained"]) == 8
        if experts == "layer":
            assert sum(".task_experts.experts.2." in name for name in report["trained"]) > 4  # copy 2 trains
