"""Training runs for tests: the trainer through the real DeepSpeed launcher on CPU ranks, and what they log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(workspace, output, *extra, stage="all", ranks=2, config="cfg.yaml", script=None, env=None):
    """The trainer (or ``script`` in its place) through the DeepSpeed launcher, on ``ranks`` CPU ranks."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    command = [
        launcher,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(29600 + os.getpid() % 300),
        str(script or REPO / "alter_ds" / "train.py"),
        "--config",
        str(workspace / config),
        "--output-dir",
        str(output),
        "--stage",
        stage,
        *extra,
    ]
    return start(command, workspace, env)


def start(command, cwd, env):
    """``command`` in its own session (so a test can signal or kill its whole tree), output captured as text."""
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def losses(run_dir, stage="stage1"):
    """step -> loss; a resumed run appends, so the last line of a step wins."""
    return metrics(run_dir, "train/loss", stage)


def metrics(run_dir, key, stage="stage1"):
    """step -> one logged value (the last line of a step wins)."""
    found = {}
    for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        found[record["step"]] = record[key]
    return found
