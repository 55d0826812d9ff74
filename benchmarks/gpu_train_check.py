"""The trainer's distributed path on this machine, checked end to end: NCCL and bf16 on a GPU, gloo and fp32 on
the CPU (``benchmarks/gpu_check.sh --dry-run``).

A tiny random Llama on synthetic tasks through the DeepSpeed launcher (ZeRO-2, 1 rank, 30 steps, a checkpoint
every 10): once uninterrupted; once stopped by SIGTERM after step 12 (it must checkpoint and exit 0), then
resumed, its losses continuing the uninterrupted run's; and every tensor handed to ``torch.distributed`` in
all three runs must lie on the rank's compute device (NCCL has no CPU tensors).

    python benchmarks/gpu_train_check.py --out /tmp/train-check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tiny_experiment import write_tiny_experiment  # noqa: E402

STEPS, STOP_AFTER = 30, 12


def launch(root: Path, name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    launcher = shutil.which("deepspeed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if launcher is None:
        raise SystemExit("the deepspeed launcher is not on PATH")
    script = REPO / "tests" / "instrumented_train.py"
    command = [launcher, "--num_gpus", "1", "--master_port", str(29400 + os.getpid() % 500), str(script)]
    command += ["--config", str(root / "check.yaml"), "--output-dir", str(root / name), "--stage", "1"]
    return subprocess.Popen(
        command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def losses(run: Path) -> dict[int, float]:
    found: dict[int, float] = {}
    path = run / "stage1" / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        found[record["step"]] = record["train/loss"]
    return found


def finish(process: subprocess.Popen[str], log: Path) -> int:
    out, _ = process.communicate(timeout=900)
    log.write_text(out)
    return process.returncode


def stop_after(process: subprocess.Popen[str], run: Path, step: int) -> None:
    """SIGTERM to the training ranks once the run has logged ``step`` (what Slurm sends before preemption)."""
    import psutil

    deadline = time.time() + 600
    while max(losses(run), default=0) < step:
        if process.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the run ended or stalled before step {step}")
        time.sleep(0.1)
    for child in psutil.Process(process.pid).children(recursive=True):
        if any(argument.startswith("--local_rank") for argument in child.cmdline()):
            child.send_signal(signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    root = args.out
    shutil.rmtree(root, ignore_errors=True)
    config = yaml.safe_load(write_tiny_experiment(root, STEPS).read_text())
    config["training"].update(
        eval_backbone=False, checkpoint_every=10, log_every=1, precision="bf16" if gpu else "fp32"
    )
    config["stages"] = config["stages"][:1]
    (root / "check.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env["RECORD_COLLECTIVES"] = str(root / "collectives")
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    problems = []

    if finish(launch(root, "full", env), root / "full.log") != 0:
        problems.append("the uninterrupted run failed (full.log)")
    stopped = launch(root, "stopped", env)
    stop_after(stopped, root / "stopped" / "tiny", STOP_AFTER)
    if finish(stopped, root / "stopped.log") != 0 or "received: checkpointed" not in (root / "stopped.log").read_text():
        problems.append("SIGTERM did not checkpoint and exit 0 (stopped.log)")
    latest = root / "stopped" / "tiny" / "stage1" / "checkpoints" / "latest"
    saved = int(latest.read_text().strip()[4:]) if latest.is_file() else 0
    if finish(launch(root, "stopped", env), root / "resumed.log") != 0:
        problems.append("the resumed run failed (resumed.log)")

    reference, resumed = losses(root / "full" / "tiny"), losses(root / "stopped" / "tiny")
    # fp32 on one CPU rank repeats the losses to rounding; bf16 on a GPU adds atomics in another order
    tolerance = 2e-2 if gpu else 1e-5
    worst = max((abs(resumed[s] - reference[s]) / abs(reference[s]) for s in range(saved + 1, STEPS + 1)
                 if s in resumed and s in reference), default=float("inf"))  # fmt: skip
    if sorted(resumed) != list(range(1, STEPS + 1)) or worst > tolerance:
        problems.append(f"resumed losses after step {saved}: worst relative difference {worst:.2e} > {tolerance}")

    devices: dict[str, int] = {}
    expected = set()
    for record_file in sorted((root / "collectives").glob("rank*.json")):
        record = json.loads(record_file.read_text())
        expected.add(record["device"])
        for key, count in record["calls"].items():
            devices[key.rsplit(" ", 1)[1]] = devices.get(key.rsplit(" ", 1)[1], 0) + count
    if len(expected) != 1 or set(devices) != expected:
        problems.append(f"collective tensors on {devices}, expected only {expected}")

    print(f"device: {'cuda, nccl, bf16' if gpu else 'cpu, gloo, fp32'}; resumed from step {saved}")
    print(f"losses after the resume: worst relative difference {worst:.2e} (tolerance {tolerance})")
    print(f"tensors handed to torch.distributed, by device: {devices}")
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
