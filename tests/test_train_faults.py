"""Faults injected into real training runs (the DeepSpeed launcher, 2 CPU ranks, ZeRO-2, a tiny Llama): a
non-finite micro-batch under gradient accumulation, and the device of every tensor handed to a collective."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_experiment import write_tiny_experiment
from training_runs import finish, launch, losses

pytest.importorskip("deepspeed")

INSTRUMENTED = Path(__file__).resolve().parent / "instrumented_train.py"
STEPS = 10
POISONED_STEP = 4  # 0-based optimizer step whose second micro-batch turns non-finite on rank 0


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory):
    """Two 2-rank runs with 2 micro-batches per optimizer step: one whose micro-batch 2·k+1 has a NaN loss on
    rank 0 only, and one that draws and drops micro-batches 2·k and 2·k+1 (the run without that step)."""
    root = tmp_path_factory.mktemp("faults")
    config = yaml.safe_load(write_tiny_experiment(root, STEPS).read_text())
    config["run_name"] = "acc"
    config["training"].update(gradient_accumulation_steps=2, eval_backbone=False, checkpoint_every=100)
    config["stages"] = config["stages"][:1]
    (root / "acc.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    first = 2 * POISONED_STEP
    runs = {}
    for name, env in {
        "poisoned": {"POISON_MICRO_BATCH": str(first + 1), "RECORD_COLLECTIVES": str(root / "collectives")},
        "dropped": {"DROP_MICRO_BATCHES": f"{first},{first + 1}"},
    }.items():
        code, out = finish(launch(root, root / name, stage="1", config="acc.yaml", script=INSTRUMENTED, env=env))
        assert code == 0, out[-4000:]
        runs[name] = root / name / "acc"
    return root, runs


@pytest.mark.slow
def test_a_non_finite_micro_batch_skips_its_whole_optimizer_step_on_every_rank(accumulation):
    """Step or skip is decided once per optimizer step: the poisoned run then trains exactly like the run that
    never saw that step's micro-batches (before, only the bad micro-batch was skipped, which moved DeepSpeed's
    accumulation boundary for the rest of the stage)."""
    _, runs = accumulation
    poisoned, dropped = losses(runs["poisoned"]), losses(runs["dropped"])
    assert sorted(poisoned) == sorted(dropped) == list(range(1, STEPS + 1))
    for step in poisoned:
        assert poisoned[step] == pytest.approx(dropped[step], rel=1e-5, abs=1e-6), step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["poisoned"] / "tb")).Reload()
    assert [e.value for e in events.Scalars("train/nonfinite_skipped")] == [1.0]
    a = load_file(runs["poisoned"] / "stage1" / "model" / "mta.safetensors")
    b = load_file(runs["dropped"] / "stage1" / "model" / "mta.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_every_collective_tensor_is_on_the_ranks_compute_device(accumulation):
    """NCCL has no CPU tensors: the trainer's own votes, log reductions and routing averages must live on the
    engine's device. On CPU that device is the CPU; on a GPU machine the same test checks CUDA."""
    root, _ = accumulation
    records = [json.loads(p.read_text()) for p in sorted((root / "collectives").glob("rank*.json"))]
    assert len(records) == 2
    for record in records:
        ours = {key: n for key, n in record["calls"].items() if key.startswith("alter_ds ")}
        assert any(" all_reduce " in key for key in ours), record  # the stop vote, log and routing reductions
        devices = {key.rsplit(" ", 1)[1] for key in record["calls"]}
        assert devices == {record["device"]}, record


# ------------------------------------------------------------------------------------ damaged checkpoints
CHECKPOINTED_STEPS = 20  # checkpoints at step10 and step20 (the last, which `latest` names)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 2-rank stage whose checkpoints (step10, step20) the tests below copy and damage."""
    root = tmp_path_factory.mktemp("damage")
    config = yaml.safe_load(write_tiny_experiment(root, CHECKPOINTED_STEPS).read_text())
    config["run_name"] = "ckpt"
    config["training"].update(eval_backbone=False, checkpoint_every=10, keep_checkpoints=3)
    config["stages"] = config["stages"][:1]
    (root / "ckpt.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = finish(launch(root, root / "full", stage="1", config="ckpt.yaml"))
    assert code == 0, out[-4000:]
    checkpoints = root / "full" / "ckpt" / "stage1" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step10", "step20"]
    return root, root / "full" / "ckpt"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resume_damaged(checkpointed, name, damage, ranks=2):
    """Copy the finished run's checkpoints (not its exported model), damage them, resume stage 1."""
    import shutil

    root, full = checkpointed
    checkpoints = root / name / "ckpt" / "stage1" / "checkpoints"
    shutil.copytree(full / "stage1" / "checkpoints", checkpoints)
    damage(checkpoints)
    code, out = finish(launch(root, root / name, stage="1", config="ckpt.yaml", ranks=ranks))
    return code, out, root / name / "ckpt"


def _partition(rank: int) -> str:
    return f"step20/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@pytest.mark.slow
@pytest.mark.parametrize(
    "damaged, remove, ranks",
    [
        pytest.param("step20/mp_rank_00_model_states.pt", False, 2, id="model-states-truncated"),
        pytest.param(_partition(0), False, 2, id="rank0-partition-truncated"),
        pytest.param(_partition(1), False, 1, id="rank1-partition-truncated-resumed-on-1-rank"),
        pytest.param(_partition(1), True, 2, id="rank1-partition-deleted"),
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_on_every_rank(checkpointed, damaged, remove, ranks):
    def damage(checkpoints):
        (checkpoints / damaged).unlink() if remove else _truncate(checkpoints / damaged)

    name = f"{Path(damaged).stem}-{remove}-{ranks}"
    code, out, run = _resume_damaged(checkpointed, name, damage, ranks)
    assert code == 0, out[-4000:]
    warnings = [line for line in out.splitlines() if "warning: checkpoint step20 cannot be used" in line]
    assert len(warnings) == 1, out[-3000:]
    assert str(run / "stage1" / "checkpoints" / damaged) in warnings[0] and "falling back to step10" in warnings[0]
    assert "resumed stage stage1 from step 10" in out and "Traceback" not in out
    reference, again = losses(checkpointed[1]), losses(run)
    assert sorted(again) == list(range(11, CHECKPOINTED_STEPS + 1))
    for step in again:
        assert again[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-4), step


@pytest.mark.slow
def test_a_garbage_latest_pointer_and_a_missing_rng_file_are_named_and_the_newest_good_checkpoint_used(
    checkpointed,
):
    def damage(checkpoints):
        (checkpoints / "latest").write_bytes(b"\x00\xff\xfe garbage")
        (checkpoints / "step20" / "rng_rank1.pt").unlink()

    code, out, run = _resume_damaged(checkpointed, "garbage-latest", damage)
    assert code == 0, out[-4000:]
    assert f"{run / 'stage1' / 'checkpoints' / 'latest'} cannot be read" in out
    assert "rng_rank1.pt is missing: rank 1 resumes with fresh random state" in out
    assert "resumed stage stage1 from step 20" in out and "Traceback" not in out


@pytest.mark.slow
def test_no_usable_checkpoint_left_is_one_clear_error_and_the_same_exit_on_every_rank(checkpointed):
    def damage(checkpoints):
        for tag in ("step10", "step20"):
            _truncate(checkpoints / tag / "mp_rank_00_model_states.pt")

    code, out, _ = _resume_damaged(checkpointed, "all-damaged", damage)
    assert code == 2, out[-4000:]
    # the same line from each rank (the launcher interleaves their output, so match the line, not its place)
    errors = re.findall(r"alter-ds train: no usable checkpoint in \S+: .*?--resume none \(or delete \S+\)", out)
    assert len(errors) == 2 and errors[0] == errors[1], out[-3000:]
    assert "step10/mp_rank_00_model_states.pt is damaged" in errors[0] and "Traceback" not in out


@pytest.mark.slow
def test_saving_a_step_that_exists_never_rewrites_the_checkpoint_latest_names_in_place(checkpointed):
    """A run killed after its last checkpoint but before exporting resumes at that step and saves it again: the
    new copy is written beside it and swapped in, so a kill during that save leaves `latest` whole."""
    full = checkpointed[1]
    before = (full / "stage1" / "checkpoints" / "step20").stat().st_ino
    inodes = {}

    def damage(checkpoints):
        inodes["copied"] = (checkpoints / "step20").stat().st_ino

    code, out, run = _resume_damaged(checkpointed, "rewrite", damage)
    assert code == 0, out[-4000:]
    assert "resumed stage stage1 from step 20" in out
    checkpoints = run / "stage1" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step20"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step10", "step20"]
    assert (checkpoints / "step20").stat().st_ino not in (inodes["copied"], before)  # a new directory
    assert (run / "stage1" / "model" / "mta.safetensors").is_file()
