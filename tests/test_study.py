"""The study driver: arms composed from a base and method files, ARG on known numbers, the report, and a real
study (2 arms x 1 seed through the DeepSpeed launcher on 2 CPU ranks) killed mid-run and resumed without
rerunning the finished arm."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_experiment import write_tiny_experiment
from training_runs import start

from alter_ds.study import (
    PUBLISH_BEGIN,
    PUBLISH_END,
    STUDY_EVAL_FILE,
    Study,
    StudyError,
    average_relative_gain,
    publish,
    report,
)

REPO = Path(__file__).resolve().parents[1]
SINGLE_ADAPTER = {
    "mta": {"num_task_experts": 1, "num_shared_experts": 0, "bottleneck_dim": 8},
    "stages": [{"name": "train", "router": {"kind": "hard"}, "train": ["task_experts"], "lr": 3e-2, "steps": 6}],
}


def write_study(root: Path, **changes) -> Path:
    study = {
        "name": "tiny",
        "base": "cfg.yaml",
        "base_overrides": {"training": {"eval_backbone": False, "checkpoint_every": 3, "log_every": 2}},
        "baseline": "single-adapter",
        "seeds": [0],
        "ranks": 2,
        "output_dir": str(root / "studies"),
        "eval": {"max_examples": 6, "batch_size": 8},
        "arms": [
            {"name": "single-adapter", "overrides": SINGLE_ADAPTER},
            {"name": "mta", "method": "cfg.yaml", "overrides": {"stages": {"stage1": {"steps": 90}}}},
        ],
    }
    study.update(changes)
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    write_tiny_experiment(tmp_path, stage1_steps=20, stage2_steps=4)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_arg_on_known_numbers():
    # (60 - 50) / 50 = +0.2 and (30 - 40) / 40 = -0.25: ARG = -0.025
    assert average_relative_gain({"a": 60.0, "b": 30.0}, {"a": 50.0, "b": 40.0}) == pytest.approx(-0.025)
    assert average_relative_gain({"a": 50.0}, {"a": 50.0}) == 0.0
    with pytest.raises(ValueError, match="baseline scores 0 on task 'a'"):
        average_relative_gain({"a": 1.0}, {"a": 0.0})


def test_arms_are_composed_from_the_base_a_method_file_and_overrides(workspace):
    study = Study(write_study(workspace))
    single = study.experiments[("single-adapter", 0)]
    mta = study.experiments[("mta", 0)]
    assert [s.name for s in single.stages] == ["train"] and single.mta.num_task_experts == 1
    assert [s.steps for s in mta.stages] == [90, 4]  # stage1 overridden by name, stage2 as in the method file
    assert mta.stages[1].router.kind == "task_weights"
    for config in (single, mta):  # what the study shares comes from the base
        assert config.tasks == study.experiments[("mta", 0)].tasks
        assert config.training.eval_backbone is False and config.training.checkpoint_every == 3
        assert config.training.output_dir == str(workspace / "studies" / "tiny" / "runs")
    assert single.run_name == "single-adapter-seed0"


def test_study_errors_name_the_arm_and_the_problem(workspace):
    bad_stage = {"name": "mta", "method": "cfg.yaml", "overrides": {"stages": {"stage9": {"steps": 1}}}}
    with pytest.raises(StudyError, match=r"arm mta.overrides.stages: no entry named 'stage9'"):
        Study(write_study(workspace, arms=[{"name": "single-adapter", "overrides": SINGLE_ADAPTER}, bad_stage]))
    bad_value = {"name": "mta", "method": "cfg.yaml", "overrides": {"stages": {"stage1": {"lr": -1.0}}}}
    with pytest.raises(StudyError, match=r"arm mta, seed 0.*stages\[0\]\.lr: must be > 0"):
        Study(write_study(workspace, arms=[{"name": "single-adapter", "overrides": SINGLE_ADAPTER}, bad_value]))
    with pytest.raises(Exception, match="baseline: unknown arm 'nope'"):
        Study(write_study(workspace, baseline="nope"))


def test_a_saved_arm_config_is_compared_by_value_with_todays_defaults(workspace):
    """A key added since the run (saved configs lack it) with its default is no change; a value is."""
    study = Study(write_study(workspace))
    run = study.runs[0]
    study._write_config(run)
    saved = yaml.safe_load(run.config_path.read_text())
    del saved["training"]["activation_checkpointing"]  # as written before the key existed
    run.config_path.write_text(yaml.safe_dump(saved, sort_keys=False))
    study._check_unchanged(run)
    saved["training"]["warmup_steps"] += 1
    run.config_path.write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(StudyError, match="its config changed since it ran"):
        study._check_unchanged(run)
    saved["training"]["no_longer_a_key"] = 1
    run.config_path.write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(StudyError, match="its config changed since it ran"):
        study._check_unchanged(run)


def _fake_record(study, run, scores_by_stage):
    stages = {
        stage: {
            "tasks": {t: {"metric": "accuracy", "score": s, "examples": 200} for t, s in scores.items()},
            "routing": {"decoder.0": [[0.5, 0.5], [0.1, 0.9]], "decoder.1": [[1.0, 0.0], [0.3, 0.7]]},
        }
        for stage, scores in scores_by_stage.items()
    }
    record = {
        "arm": run.arm,
        "seed": run.seed,
        "split": "test",
        "scored_as": study.scored_as(run),
        "final_stage": list(scores_by_stage)[-1],
        "stages": stages,
        "seconds": 60.0,
        "train_seconds": 90.0 + 30.0 * run.seed,
        "trainable_parameters": {stage: 1000 for stage in scores_by_stage},
        "mean_step_seconds": {stage: 0.1 for stage in scores_by_stage},
    }
    path = run.run_dir / "eval" / STUDY_EVAL_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))


def test_report_means_spreads_and_arg_against_the_baseline_mean(workspace):
    study = Study(write_study(workspace, seeds=[0, 1], eval={"backbone": False}))
    known = {
        ("single-adapter", 0): {"train": {"a": 50.0, "b": 40.0}},
        ("single-adapter", 1): {"train": {"a": 70.0, "b": 40.0}},  # baseline mean: a 60, b 40
        ("mta", 0): {"stage1": {"a": 60.0, "b": 40.0}, "stage2": {"a": 66.0, "b": 44.0}},  # ARG +0.1
        ("mta", 1): {"stage1": {"a": 60.0, "b": 40.0}, "stage2": {"a": 72.0, "b": 48.0}},  # ARG +0.2
    }
    for run in study.runs:
        _fake_record(study, run, known[(run.arm, run.seed)])
    results = report(study)
    baseline, mta = results["arms"]["single-adapter"], results["arms"]["mta"]
    assert baseline["mean"]["train"] == {"a": 60.0, "b": 40.0}
    assert baseline["std"]["train"]["a"] == pytest.approx(14.142, abs=1e-3)
    assert mta["arg"]["stage2"]["per_seed"] == pytest.approx([0.1, 0.2])
    assert mta["arg"]["stage2"]["mean"] == pytest.approx(0.15)
    assert mta["arg"]["stage2"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert mta["arg"]["stage1"]["mean"] == pytest.approx(0.0)
    assert baseline["arg"]["train"]["per_seed"] == pytest.approx([(-10 / 60) / 2, (10 / 60) / 2])
    assert results["tasks"]["a"]["accuracy_95ci_half_width_at_50pct"] == pytest.approx(6.93, abs=0.01)
    markdown = (study.root / "results.md").read_text()
    assert "| mta | 2 | 15.00 ± 7.07 | 1,000 + 1,000 | 1.8 |" in markdown  # (90 s + 120 s) / 2 in steps
    assert "| a | +9.0 |" in markdown  # mta's mean on a (69) minus the baseline's (60)
    assert "| mta | stage1 | 0.00 ± 0.00 |" in markdown
    for png in ("per_task.png", "train_loss.png", "routing.png", "routing_categories.png"):
        assert (study.root / png).stat().st_size > 5_000, png
    assert results["routing_analysis"]["arm"] == "mta" and results["routing_analysis"]["seed"] in (0, 1)
    assert "## What `mta` routes by" in markdown and "declare one category only" in markdown
    saved = json.loads((study.root / "results.json").read_text())
    assert saved["arms"]["mta"]["arg"]["stage2"]["mean"] == pytest.approx(0.15)


def test_scores_for_other_evaluation_settings_are_stale(workspace):
    """A run scored on 6 examples is not finished for a study that now asks for 4: the report leaves it out
    (never mixing evaluation sets) and the driver scores it again."""
    study = Study(write_study(workspace, eval={"backbone": False, "max_examples": 6}))
    for run in study.runs:
        scores = {"train": {"a": 50.0}} if run.arm == "single-adapter" else {"stage1": {"a": 5.0}, "stage2": {"a": 6.0}}
        _fake_record(study, run, scores)
    assert [study._finished(run) for run in study.runs] == [True, True]
    assert report(study)["runs_missing"] == []
    fewer = Study(write_study(workspace, eval={"backbone": False, "max_examples": 4}))
    assert [fewer.record(run) for run in fewer.runs] == [None, None]
    assert not any(fewer._finished(run) for run in fewer.runs)
    assert report(fewer)["runs_missing"] == [run.name for run in fewer.runs]
    last_only = Study(write_study(workspace, eval={"backbone": False, "max_examples": 6, "stages": "last"}))
    assert last_only.record(last_only.runs[0]) is not None  # one stage: "last" and "all" score the same
    assert last_only.record(last_only.runs[1]) is None  # two stages: the record scored both


def _start(study_file: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return start([sys.executable, "-m", "alter_ds.cli", "study", str(study_file)], cwd, env)


@pytest.mark.slow
def test_a_killed_study_resumes_without_rerunning_the_finished_arm(workspace):
    pytest.importorskip("deepspeed")
    study_file = write_study(workspace)
    study = Study(study_file)
    first, second = study.runs
    process = _start(study_file, workspace)
    deadline = time.time() + 600
    while not (second.run_dir / "stage1" / "checkpoints" / "latest").is_file():
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "the second run never checkpointed"
        time.sleep(0.5)
    assert (first.run_dir / "eval" / STUDY_EVAL_FILE).is_file()
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the launcher's ranks, mid-training
    process.wait()
    assert not (second.run_dir / "eval" / STUDY_EVAL_FILE).exists()
    first_log = (first.run_dir / "train.log").read_text()
    first_result = (first.run_dir / "eval" / STUDY_EVAL_FILE).read_text()

    process = _start(study_file, workspace)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out
    assert "[1/2] single-adapter-seed0: done earlier, skipped" in out
    assert "Loading weights" not in out  # the driver's own output is one line per step of the study
    assert (first.run_dir / "train.log").read_text() == first_log  # not trained again
    assert (first.run_dir / "eval" / STUDY_EVAL_FILE).read_text() == first_result
    resumed = re.search(r"resumed stage stage1 from step (\d+)", (second.run_dir / "train.log").read_text())
    assert resumed is not None and 3 <= int(resumed.group(1)) < 90  # killed mid-stage, continued from there
    results = json.loads((study.root / "results.json").read_text())
    assert results["runs_missing"] == []
    records = {r.arm: json.loads((r.run_dir / "eval" / STUDY_EVAL_FILE).read_text()) for r in study.runs}
    final = {arm: r["stages"][r["final_stage"]]["tasks"] for arm, r in records.items()}
    assert {t: v["examples"] for t, v in final["mta"].items()} == {t: 6 for t in final["mta"]}
    reference = {t: v["score"] for t, v in final["single-adapter"].items() if v["score"] > 0}
    assert set(results["arg_excluded_tasks"]) == set(final["mta"]) - set(reference)
    expected = average_relative_gain({t: v["score"] for t, v in final["mta"].items()}, reference)
    assert results["arms"]["mta"]["arg"]["stage2"]["mean"] == pytest.approx(expected)
    assert set(records["mta"]["stages"]) == {"stage1", "stage2"}  # both stages scored on the same examples
    assert (study.root / "results.md").is_file() and (study.root / "routing.png").is_file()

    # evaluation settings changed: every run is scored again on the new examples, none is trained again
    logs = {run.name: (run.run_dir / "train.log").read_text() for run in study.runs}
    fewer = write_study(workspace, eval={"max_examples": 4, "batch_size": 8})
    process = _start(fewer, workspace)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    assert "[1/2] single-adapter-seed0: trained earlier; its scores were for other evaluation settings" in out
    assert "training (" not in out
    assert {run.name: (run.run_dir / "train.log").read_text() for run in study.runs} == logs
    for run in study.runs:
        record = json.loads((run.run_dir / "eval" / STUDY_EVAL_FILE).read_text())
        assert {v["examples"] for v in record["stages"][record["final_stage"]]["tasks"].values()} == {4}
    assert json.loads((study.root / "backbone_eval.json").read_text())["scored_as"]["max_examples"] == 4

    # the same study with an arm changed after it ran is refused, naming the arm
    slower = {**SINGLE_ADAPTER, "stages": [{**SINGLE_ADAPTER["stages"][0], "lr": 1e-2}]}
    changed = write_study(workspace, arms=[{"name": "single-adapter", "overrides": slower}])
    process = _start(changed, workspace)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "arm 'single-adapter' seed 0: its config changed since it ran" in out


def test_publish_replaces_only_the_marked_block_and_copies_the_figures(workspace):
    study = Study(write_study(workspace, eval={"backbone": False}))
    for run in study.runs:
        scores = (
            {"train": {"a": 50.0}} if run.arm == "single-adapter" else {"stage1": {"a": 55.0}, "stage2": {"a": 60.0}}
        )
        _fake_record(study, run, scores)
    report(study)
    doc = workspace / "docs" / "quality.md"
    doc.parent.mkdir()
    doc.write_text(f"# Quality\n\nprose before\n\n{PUBLISH_BEGIN}\nold table\n{PUBLISH_END}\n\nprose after\n")
    publish(study, doc)
    text = doc.read_text()
    assert text.startswith("# Quality\n\nprose before") and text.endswith("prose after\n")
    assert "old table" not in text and "| mta | 1 | 20.00 |" in text
    assert "![per-task scores](quality/per_task.png)" in text and (doc.parent / "quality" / "per_task.png").is_file()
    publish(study, doc)  # idempotent
    assert doc.read_text() == text
    (workspace / "other.md").write_text("no markers")
    with pytest.raises(StudyError, match="no study markers"):
        publish(study, workspace / "other.md")


def test_a_study_that_extends_another_adds_arms_and_seeds_and_shares_its_runs(workspace):
    parent = write_study(workspace)
    child = workspace / "more.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "extends": parent.name,
                "eval": {"batch_size": 4},
                "arms": [
                    {"name": "mta", "seeds": [0, 1]},
                    {
                        "name": "more-steps",
                        "overrides": dict(SINGLE_ADAPTER, stages=[{**SINGLE_ADAPTER["stages"][0], "steps": 9}]),
                    },
                ],
            }
        )
    )
    base, more = Study(parent), Study(child)
    assert more.root == base.root  # the same study directory: the parent's finished runs count as done
    assert [run.name for run in more.runs] == ["single-adapter-seed0", "mta-seed0", "more-steps-seed0", "mta-seed1"]
    for run in base.runs:  # the parent's runs are the same runs, with the same configs
        assert more.experiments[(run.arm, run.seed)] == base.experiments[(run.arm, run.seed)]
        assert run in more.runs
    assert more.config.eval.batch_size == 4 and more.config.eval.max_examples == 6  # given here / the parent's
    assert more.experiments[("more-steps", 0)].stages[0].steps == 9

    child.write_text(yaml.safe_dump({"extends": parent.name, "arms": [{"name": "mta", "seeds": []}]}))
    with pytest.raises(StudyError, match=r"more.yaml.*seeds: list at least one seed"):
        Study(child)
    child.write_text(yaml.safe_dump({"extends": "more.yaml"}))
    with pytest.raises(StudyError, match=r"more\.yaml: extends itself"):
        Study(child)
    child.write_text(yaml.safe_dump({"extends": "missing.yaml"}))
    with pytest.raises(StudyError, match=r"missing\.yaml not found"):
        Study(child)


#: the shipped study files (configs/study also holds task files for `alter-ds transfer`)
SHIPPED_STUDIES = [
    path
    for path in sorted((REPO / "configs" / "study").glob("*.yaml"))
    if {"arms", "extends"} & set(yaml.safe_load(path.read_text()))
]


@pytest.mark.parametrize("path", SHIPPED_STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_loads(path, monkeypatch):
    """The shipped studies compose every arm and seed (their files resolve from the repository root)."""
    monkeypatch.chdir(REPO)
    study = Study(path.relative_to(REPO))
    assert study.runs and {run.arm for run in study.runs} == {arm.name for arm in study.config.arms}
