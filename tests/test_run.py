"""RunLayout: one definition of a run's paths and of how a stage is chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from alter_ds.config import ExperimentConfig, ModelConfig, StageConfig, TaskConfig, TrainingConfig
from alter_ds.run import RunLayout, StageChoiceError


def layout() -> RunLayout:
    config = ExperimentConfig(
        ModelConfig("m"),
        [TaskConfig("a")],
        run_name="r",
        training=TrainingConfig(output_dir="out"),
        stages=[StageConfig("warm"), StageConfig("mix")],
    )
    return RunLayout.of(config)


def test_paths_and_stage_choice():
    run = layout()
    assert run.root == Path("out/r") and run.model_dir(1) == Path("out/r/stage2/model")
    assert run.checkpoints(0) == Path("out/r/stage1/checkpoints") and run.eval_dir == Path("out/r/eval")
    assert run.select("all") == [0, 1] and run.select("2") == [1] and run.select("mix") == [1]
    assert run.stage_index("warm") == 0 and run.stage_index("1") == 0
    for bad in ("3", "0", "x", "-1"):
        with pytest.raises(StageChoiceError, match=rf"--stage {bad}: choose 1..2, a stage name \['warm', 'mix'\]"):
            run.select(bad)
    with pytest.raises(StageChoiceError, match="no stages"):
        RunLayout(Path("x"), ()).select("all")


def test_a_stage_is_finished_once_its_summary_and_model_exist(tmp_path):
    run = RunLayout(tmp_path, ("s",))
    assert not run.stage_finished(0)
    run.model_dir(0).mkdir(parents=True)
    (run.model_dir(0) / "mta_config.json").write_text("{}")
    assert not run.stage_finished(0)
    run.summary_file(0).write_text("{}")
    assert run.stage_finished(0)
