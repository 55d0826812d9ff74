"""The trainer through the real DeepSpeed launcher with 2 CPU ranks and ZeRO-2 (tiny random Llama, synthetic
tasks): both stages, partitioned optimizer state, frozen groups untouched, TensorBoard events read back, and
resume after kill -9 or a preemption signal reproducing the uninterrupted losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_experiment import task_specs, write_tiny_experiment
from tiny_models import tiny_backbone, tiny_tokenizer
from training_runs import finish, launch, losses, metrics

pytest.importorskip("deepspeed")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
STAGE1_STEPS = 60
# fp32, one thread per rank, same data order: a resumed run repeats the uninterrupted losses to rounding.
LOSS_TOLERANCE = 1e-5
WARMUP_STEPS = 12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    path = write_tiny_experiment(root, STAGE1_STEPS)
    config = yaml.safe_load(path.read_text())
    # A warmup longer than the first checkpoint: a run resumed at step 10 is mid-warmup, where a wrong rate shows.
    config["training"].update(warmup_steps=WARMUP_STEPS, keep_checkpoints=STAGE1_STEPS // 10)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def assert_losses_continue(resumed, reference, resumed_from, tolerance):
    """Every step after the resume point has the uninterrupted run's loss (relative and absolute tolerance)."""
    for step in range(resumed_from + 1, STAGE1_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=tolerance, abs=tolerance), step


def wait_for_step(run_dir, step, process, timeout=300):
    deadline = time.time() + timeout
    path = run_dir / "stage1" / "metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if path.is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def full_run(workspace):
    process = launch(workspace, workspace / "full")
    code, out = finish(process)
    assert code == 0, out[-4000:]
    return workspace / "full" / "tiny", out


@pytest.mark.slow
def test_two_stages_train_with_zero2_on_two_ranks(full_run):
    run, out = full_run
    stage1 = losses(run)
    assert sorted(stage1) == list(range(1, STAGE1_STEPS + 1))
    first, last = (
        sum(stage1[s] for s in range(1, 6)) / 5,
        sum(stage1[s] for s in range(STAGE1_STEPS - 4, STAGE1_STEPS + 1)) / 5,
    )
    assert last < first - 0.05, (first, last)
    # ZeRO-2 partitions the optimizer state: each rank holds half of the fp32 master weights
    step_dir = run / "stage1" / "checkpoints" / f"step{STAGE1_STEPS}"
    parts = [
        torch.load(step_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False) for r in range(2)
    ]
    sizes = [sum(t.numel() for t in p["optimizer_state_dict"]["single_partition_of_fp32_groups"]) for p in parts]
    summary = json.loads((run / "stage1" / "summary.json").read_text())
    trainable = sum(g["trainable"] for g in summary["parameters"].values())
    assert sizes[0] == sizes[1] and abs(sum(sizes) - trainable) <= 2 * 16  # alignment padding at most
    # stage 2 trains the router only: every expert weight is exactly stage 1's
    one, two = (
        load_file(run / "stage1" / "model" / "mta.safetensors"),
        load_file(run / "stage2" / "model" / "mta.safetensors"),
    )
    experts = [k for k in one if "experts" in k]
    assert experts and all(torch.equal(one[k], two[k]) for k in experts)
    logits = [k for k in two if k.endswith("router.task_logits")]
    assert logits and any((two[k] - two[k].round()).abs().max() > 1e-4 for k in logits)  # moved away from the 4/0 prior
    # the stage-2 checkpoint holds the router only, not the frozen model
    model_states = torch.load(
        run / "stage2" / "checkpoints" / "step10" / "mp_rank_00_model_states.pt", weights_only=False
    )
    assert set(model_states["module"]) == {k for k in model_states["module"] if "router" in k}
    assert "per-task dev metrics" in out and (run / "eval" / "stage2_dev.json").is_file()


@pytest.mark.slow
def test_tensorboard_events_hold_the_training_story(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = full_run
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/samples_per_s",
        "train_loss/reverse",
        "train_loss/parity",
    ):
        assert f"stage1/{tag}" in scalars, tag
    # routing as summaries: per task, and per layer entropy and top share; never one chart per layer x expert
    tasks, layers = len(task_specs(["string", "rule"])), 2
    for prefix in ("stage1/routing", "stage2/routing", "eval/stage2"):
        routing = {t for t in scalars if t.startswith(f"{prefix}/") and ("/entropy/" in t or "/layer_" in t)}
        assert f"{prefix}/entropy/reverse" in scalars and f"{prefix}/layer_top_share/decoder.0" in scalars
        assert len(routing) == tasks + 2 * layers
    assert not any("expert_usage" in t for t in scalars)
    assert "eval/reverse/exact_match" in scalars and "eval/parity/accuracy" in scalars
    assert "eval/stage2/routing" in events.Tags()["images"]
    saved = json.loads((run / "eval" / "stage2_routing.json").read_text())
    assert len(saved["tasks"]) == tasks and set(saved["layers"]) == {"decoder.0", "decoder.1"}
    assert (run / "eval" / "stage2_routing.png").stat().st_size > 10_000
    assert len(events.Scalars("stage1/train/loss")) == STAGE1_STEPS


@pytest.mark.slow
def test_kill_9_mid_stage_then_resume_repeats_the_uninterrupted_losses(workspace, full_run):
    reference = losses(full_run[0])
    output = workspace / "killed"
    process = launch(workspace, output, stage="1")
    wait_for_step(output / "tiny", 13, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    latest = (output / "tiny" / "stage1" / "checkpoints" / "latest").read_text().strip()
    resumed_from = int(latest[4:])
    assert 10 <= resumed_from < STAGE1_STEPS
    code, out = finish(launch(workspace, output, stage="1"))
    assert code == 0, out[-4000:]
    assert f"resumed stage stage1 from step {resumed_from}" in out
    again = losses(output / "tiny")
    assert_losses_continue(again, reference, resumed_from, LOSS_TOLERANCE)


@pytest.mark.slow
def test_preemption_signal_checkpoints_exits_zero_and_resumes(workspace, full_run):
    reference = losses(full_run[0])
    output = workspace / "preempted"
    process = launch(workspace, output, stage="1")
    wait_for_step(output / "tiny", 5, process)
    ranks = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if any(a.startswith("--local_rank") for a in p.cmdline())
    ]
    assert len(ranks) == 2
    # One rank only (what Slurm sends at preemption/cancel; USR1 is the early warning, tested through Slurm):
    # the other must learn of it through the per-step vote, or the ranks' collectives diverge and hang.
    ranks[0].send_signal(signal.SIGTERM)
    code, out = finish(process)
    assert code == 0, out[-4000:]
    assert "received: checkpointed stage stage1" in out
    saved = int((output / "tiny" / "stage1" / "checkpoints" / "latest").read_text().strip()[4:])
    assert 5 <= saved < STAGE1_STEPS
    states = output / "tiny" / "stage1" / "checkpoints" / f"step{saved}" / "mp_rank_00_model_states.pt"
    seconds_before = torch.load(states, map_location="cpu", weights_only=False)["step_seconds"]
    assert seconds_before > 0
    code, out = finish(launch(workspace, output, stage="1"))
    assert code == 0 and f"resumed stage stage1 from step {saved}" in out
    again = losses(output / "tiny")
    assert sorted(again) == list(range(1, STAGE1_STEPS + 1))
    assert_losses_continue(again, reference, saved, LOSS_TOLERANCE)
    summary = json.loads((output / "tiny" / "stage1" / "summary.json").read_text())
    assert summary["train_seconds"] > seconds_before  # the stage's step time carries over the resume
    assert summary["mean_step_seconds"] == pytest.approx(summary["train_seconds"] / STAGE1_STEPS, rel=1e-3)


@pytest.mark.slow
def test_resume_a_two_rank_checkpoint_on_one_rank(workspace, full_run):
    """The whole trainable state (fp32 weights, Adam moments) is re-partitioned; accumulation doubles so each
    optimizer step sees the same global batch; mid-warmup, the optimizer takes the schedule's rate, not the one
    it was built with; and the losses continue as in the 2-rank run."""
    reference = losses(full_run[0])
    resumed_from = 10
    assert resumed_from < WARMUP_STEPS
    output = workspace / "one-rank" / "tiny" / "stage1"
    shutil.copytree(full_run[0] / "stage1" / "checkpoints", output / "checkpoints")
    (output / "checkpoints" / "latest").write_text(f"step{resumed_from}\n")
    code, out = finish(launch(workspace, workspace / "one-rank", stage="1", ranks=1))
    assert code == 0, out[-4000:]
    assert "resuming a 2-rank checkpoint on 1 rank(s): gradient accumulation 2" in out
    assert f"resumed stage stage1 from step {resumed_from}" in out
    again = losses(workspace / "one-rank" / "tiny")
    assert_losses_continue(again, reference, resumed_from, 1e-4)
    rates = {s: r for s, r in metrics(workspace / "one-rank" / "tiny", "train/lr").items() if s > resumed_from}
    assert rates == pytest.approx({s: r for s, r in metrics(full_run[0], "train/lr").items() if s > resumed_from})


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(workspace):
    corrupt = tiny_backbone("llama")
    with torch.no_grad():
        corrupt.lm_head.weight[5, 0] = float("nan")  # a corrupt checkpoint: every loss is NaN
    corrupt.save_pretrained(workspace / "corrupt-llama")
    tiny_tokenizer().save_pretrained(workspace / "corrupt-llama")
    config = yaml.safe_load((workspace / "cfg.yaml").read_text())
    config["run_name"] = "diverges"
    config["model"]["name_or_path"] = str(workspace / "corrupt-llama")
    config["training"]["max_nonfinite_steps"] = 3
    (workspace / "diverge.yaml").write_text(yaml.safe_dump(config))
    code, out = finish(launch(workspace, workspace / "nan", stage="1", config="diverge.yaml"))
    assert code == 2, out[-3000:]
    assert "3 steps in a row with a non-finite loss or gradient" in out and "checkpointed" in out
    assert "Traceback" not in out  # one clear message, not a stack
    run = workspace / "nan" / "diverges"
    assert (run / "stage1" / "checkpoints" / "latest").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    assert events.Scalars("train/nonfinite_skipped")[-1].value == 3


@pytest.mark.slow
def test_eval_command_on_a_finished_run(full_run, capsys):
    from alter_ds.cli import main

    run, out = full_run
    assert "backbone" in out.split("per-task dev metrics")[1]  # the backbone column of the final table
    during_training = (run / "eval" / "stage2_dev.json").read_text()
    assert main(["eval", str(run), "--split", "dev", "--max-examples", "3"]) == 0
    assert (run / "eval" / "stage2_dev.json").read_text() == during_training  # what training wrote stays
    assert {r["examples"] for r in json.loads((run / "eval" / "stage2_dev_3.json").read_text()).values()} == {3}
    assert main(["eval", str(run), "--split", "test", "--max-examples", "4"]) == 0
    results = json.loads((run / "eval" / "stage2_test_4.json").read_text())
    assert set(results) == {"reverse", "uppercase", "sort_letters", "first_last", "parity", "vowel_start", "long_word"}
    assert all(r["examples"] == 4 for r in results.values())
    assert "stage2 (test)" in capsys.readouterr().out
    assert main(["eval", str(run), "--stage", "9"]) == 2
    assert main(["eval", str(run), "--stage", "nope"]) == 2
    assert "--stage nope: choose 1..2, a stage name ['stage1', 'stage2'], or all" in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_command_on_a_finished_run(full_run, capsys):
    """The routing the trainer recorded on dev, analysed against the synthetic families (two categories)."""
    from alter_ds.cli import main

    run, _ = full_run
    assert main(["analyze", str(run), "--stage", "1"]) == 0
    printed = capsys.readouterr().out
    assert "clustering by routing vs categories: ARI" in printed
    saved = json.loads((run / "analysis" / "stage1" / "analysis.json").read_text())
    assert saved["categories"] == ["string"] * 4 + ["rule"] * 3 and len(saved["clusters"]) == 7
    # stage 1 routes each task to its own expert and the shared one: no layer collapses onto one expert
    assert saved["warnings"] == [] and all(0 < b <= 1 for b in saved["expert_balance"].values())
    assert (run / "analysis" / "stage1" / "routing.png").is_file()


@pytest.mark.slow
def test_alter_paper_recipe_on_a_seq2seq_model(tmp_path):
    """The alter-paper preset's stages on a tiny T5: FFN-copy experts in the middle layer, stage 1 trains
    everything with the task-weights selector, stage 2 adds a pretrained shared expert and the gate."""
    tiny_backbone("t5").save_pretrained(tmp_path / "tiny-t5")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny-t5")
    preset = yaml.safe_load((REPO / "configs" / "alter-paper.yaml").read_text())
    tasks = task_specs(["arithmetic", "rule"])
    for task in tasks:
        task["max_examples"] = {"dev": 4}
    preset.update(
        run_name="paper",
        model={"name_or_path": str(tmp_path / "tiny-t5")},
        tasks=tasks,
        training={"micro_batch_size": 4, "log_every": 2, "checkpoint_every": 5, "warmup_steps": 1},
    )
    preset["stages"][0].update(steps=6, lr=1e-3)
    preset["stages"][1].update(steps=4, lr=1e-3)
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(preset))
    code, out = finish(launch(tmp_path, tmp_path / "runs", config="paper.yaml"))
    assert code == 0, out[-4000:]
    run = tmp_path / "runs" / "paper"
    one = json.loads((run / "stage1" / "summary.json").read_text())["parameters"]
    two = json.loads((run / "stage2" / "summary.json").read_text())["parameters"]
    assert one["backbone"]["trainable"] > 0 and one["router"]["trainable"] > 0
    assert two["backbone"]["trainable"] == 0 and two["shared_experts"]["trainable"] > 0
    assert (run / "stage1" / "model" / "backbone").is_dir()  # stage 1 trained the backbone: saved with the model
    assert json.loads((run / "stage2" / "model" / "mta_config.json").read_text())["router"]["kind"] == "gate"
    assert set(json.loads((run / "eval" / "stage2_dev.json").read_text())) == {t["name"] for t in tasks}


@pytest.mark.slow
def test_optimizer_offload_config_trains(workspace):
    config = yaml.safe_load((workspace / "cfg.yaml").read_text())
    config["run_name"] = "offload"
    config["training"].update(deepspeed_config="ds_configs/zero2_offload.json", precision="fp32", checkpoint_every=3)
    config["stages"][0]["steps"] = 6
    config["stages"] = config["stages"][:1]
    (workspace / "offload.yaml").write_text(yaml.safe_dump(config))
    code, out = finish(launch(workspace, workspace / "offload", config="offload.yaml"))
    assert code == 0, out[-4000:]
    effective = json.loads((workspace / "offload" / "offload" / "ds_config.json").read_text())
    assert effective["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert effective["bf16"]["enabled"] is False  # precision: fp32 overrides the file
    assert sorted(losses(workspace / "offload" / "offload")) == list(range(1, 7))


@pytest.mark.slow
def test_task_embedding_stage_with_inputs_init_and_group_rates(workspace, monkeypatch):
    """The task-level MoE's stage 1 on two ranks: straight-through Gumbel over the shared table's routes,
    the table initialised from each task's inputs, experts, routers and table at rates of their own."""
    config = yaml.safe_load((workspace / "cfg.yaml").read_text())
    config["run_name"] = "task-moe"
    stage = config["stages"][0]
    stage.update(
        steps=6,
        train=["task_experts", "shared_experts", "router", "task_embeddings"],
        lr=1e-3,
        group_lr={"task_experts": 1e-2, "shared_experts": 1e-2, "task_embeddings": 1e-1},
        router={
            "kind": "task_embedding",
            "mode": "st_gumbel",
            "temperature": 2.0,
            "temperature_decay": 3e-4,
            "min_temperature": 0.1,
            "embedding_init": "inputs",
            "embedding_examples": 4,
        },
    )
    config["stages"] = [stage]
    (workspace / "task-moe.yaml").write_text(yaml.safe_dump(config))
    code, out = finish(launch(workspace, workspace / "task-moe", config="task-moe.yaml"))
    assert code == 0, out[-4000:]
    assert out.count("task embeddings: each task's mean input state over 4 examples") == 1  # rank 0 says it
    run = workspace / "task-moe" / "task-moe"
    assert sorted(losses(run)) == list(range(1, 7))
    rates = [metrics(run, "train/lr")[step] for step in range(1, 7)]  # the stage's lr in warmup: group 0's
    assert rates == pytest.approx([1e-3 * step / (WARMUP_STEPS + 1) for step in range(1, 7)])
    from alter_ds.mta import MTAModel

    trained = MTAModel.from_pretrained(run / "stage1" / "model")
    table = trained.task_embeddings
    assert table is not None and table.weight.shape == (len(trained.tasks), trained.config.hidden_size)
    assert trained.router_config.kind == "task_embedding"
    # Each row started as its task's mean input state (recomputed here from the same data and backbone) and
    # moved at most by the table's rates: Adam moves an element by about lr per step, and the table's lr over
    # these six warmup steps sums to 0.1 * 21 / 13 = 0.16. N(0, 1) rows would be ~1 away.
    from alter_ds.config import load_config
    from alter_ds.data.collate import MultiTaskCollator
    from alter_ds.data.multitask import MultiTaskData
    from alter_ds.mta.backbone import load_tokenizer
    from alter_ds.mta.model import build_model
    from alter_ds.mta.task_embeddings import init_from_inputs

    monkeypatch.chdir(workspace)
    experiment = load_config("task-moe.yaml")
    tokenizer = load_tokenizer(experiment.model)
    data = MultiTaskData.load(experiment.tasks, tokenizer, False, "train", experiment.data.root, experiment.seed)
    fresh = build_model(experiment)
    fresh.apply_stage(experiment.stages[0])
    start = init_from_inputs(fresh, data.examples, MultiTaskCollator(tokenizer.pad_token_id, False), 4)
    moved = float((table.weight.detach() - start).abs().max())
    assert 1e-4 < moved < 0.2, moved
    assert float((start[0] - start[1]).abs().max()) > 1e-3  # tasks with different inputs start apart


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["torchrun", "alter-ds train"])
def test_torchrun_and_the_cli_start_the_same_trainer(workspace, entry):
    config = yaml.safe_load((workspace / "cfg.yaml").read_text())
    config["run_name"] = entry.replace(" ", "-")
    config["training"]["output_dir"] = str(workspace / "entries")
    config["stages"] = config["stages"][:1]
    config["stages"][0]["steps"] = 4
    path = workspace / f"{config['run_name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    bin_dir = Path(sys.executable).parent
    if entry == "torchrun":
        command = [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "alter_ds" / "train.py"),
            "--config",
            str(path),
        ]
    else:  # the run's place given on the command line, as the trainer's own options (not in the YAML)
        elsewhere = {**config, "run_name": "other", "training": {**config["training"], "output_dir": "elsewhere"}}
        path.write_text(yaml.safe_dump(elsewhere))
        command = [str(bin_dir / "alter-ds"), "train", str(path), "--ranks", "2"]
        command += ["--output-dir", str(workspace / "entries"), "--run-name", config["run_name"]]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(command, env=env, cwd=workspace, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run = workspace / "entries" / config["run_name"]
    assert not (workspace / "elsewhere").exists()
    assert sorted(losses(run)) == [1, 2, 3, 4] and (run / "stage1" / "model" / "mta.safetensors").is_file()


@pytest.mark.slow
def test_clear_errors_for_a_bad_config_a_missing_stage_and_a_foreign_checkpoint(workspace, full_run):
    config = yaml.safe_load((workspace / "cfg.yaml").read_text())
    (workspace / "bad.yaml").write_text(
        (workspace / "cfg.yaml").read_text().replace("bottleneck_dim:", "bottleneck_dm:")
    )
    code, out = finish(launch(workspace, workspace / "errors", config="bad.yaml"))
    assert code == 2 and "bad.yaml:" in out and "mta.bottleneck_dm: unknown key" in out and "Traceback" not in out
    code, out = finish(launch(workspace, workspace / "errors", stage="2"))
    assert code == 2 and "run that stage first (--stage stage1)" in out and "Traceback" not in out
    config["mta"]["bottleneck_dim"] = 4  # another model, same run directory: its checkpoint must be refused
    (workspace / "other.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(full_run[0] / "stage1" / "checkpoints", workspace / "foreign" / "tiny" / "stage1" / "checkpoints")
    code, out = finish(launch(workspace, workspace / "foreign", config="other.yaml", stage="1"))
    assert code == 2 and "was written by another model" in out and "use a new run_name" in out


@pytest.mark.slow
def test_bf16_training_exports_the_fp32_master_weights(workspace):
    config = yaml.safe_load((workspace / "cfg.yaml").read_text())
    config["run_name"] = "bf16"
    config["training"].update(precision="bf16", checkpoint_every=2)
    config["stages"] = config["stages"][:1]
    config["stages"][0]["steps"] = 3
    (workspace / "bf16.yaml").write_text(yaml.safe_dump(config))
    code, out = finish(launch(workspace, workspace / "bf16", config="bf16.yaml"))
    assert code == 0, out[-4000:]
    run = workspace / "bf16" / "bf16"
    assert json.loads((run / "ds_config.json").read_text())["bf16"]["enabled"] is True
    exported = load_file(run / "stage1" / "model" / "mta.safetensors")
    experts = {k: v for k, v in exported.items() if "w_down" in k}
    assert experts and all(v.dtype == torch.float32 for v in experts.values())
    # fp32 masters carry bits a bf16 copy cannot hold: at least some exported values are not bf16-representable
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in experts.values())
