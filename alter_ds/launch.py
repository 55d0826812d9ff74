"""How alter-ds starts its trainer: ``alter_ds/train.py`` under the DeepSpeed launcher, on this machine's GPUs
or, without one, on CPU ranks. ``alter-ds train`` and ``alter-ds study`` both start it this way."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from alter_ds.errors import MissingFileError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
REPO = TRAIN_SCRIPT.parents[1]


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def launcher_command(
    train_args: Sequence[str], ranks: int, master_port: int | None = None, log_level: str = "warning"
) -> list[str]:
    """The launcher command for ``ranks`` processes running the trainer with ``train_args``; DeepSpeed's own
    INFO lines are left out unless ``log_level`` asks for them."""
    search = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    launcher = shutil.which("deepspeed", path=search)
    if launcher is None:
        raise MissingFileError("the deepspeed launcher is not on PATH: pip install deepspeed")
    command = [launcher, "--log_level", log_level, "--num_gpus", str(ranks)]
    if master_port is not None:
        command += ["--master_port", str(master_port)]
    return [*command, str(TRAIN_SCRIPT), *train_args]


def launcher_env(ranks: int) -> dict[str, str]:
    """The environment of the launched ranks: the package importable from a checkout and, on a machine without
    a GPU, DeepSpeed's CPU accelerator with the cores shared among the ranks (what the user set wins)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return env


def add_training_arguments(parser: argparse.ArgumentParser, positional_config: bool = False) -> None:
    """The trainer's options, defined once: this script's parser and ``alter-ds train`` (which passes them on
    through the launcher) both take them."""
    if positional_config:
        parser.add_argument("config", help="experiment YAML")
    else:
        parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--stage", default="all", help="1, 2, ... or a stage name, or all (default)")
    parser.add_argument("--resume", default="auto", choices=["auto", "none"], help="resume from the latest checkpoint")
    parser.add_argument("--output-dir", default=None, help="override training.output_dir")
    parser.add_argument("--run-name", default=None, help="override run_name (the run directory's name)")


def training_arguments(args: argparse.Namespace) -> list[str]:
    """``args`` (parsed with ``add_training_arguments``) as this script's command line."""
    line = ["--config", args.config, "--stage", args.stage, "--resume", args.resume]
    for option, value in (("--output-dir", args.output_dir), ("--run-name", args.run_name)):
        if value is not None:
            line += [option, value]
    return line
