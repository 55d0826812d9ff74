"""RunLayout: where a run's files live and how a stage is named on the command line, in one place.

The trainer writes these paths, and evaluation, studies and resumption read them; each used to spell them
out, and an unknown stage got a different answer from each.

    runs/<run_name>/config.yaml  ds_config.json  tb/  eval/  analysis/  export/
                   stage<i>/checkpoints/  model/  metrics.jsonl  summary.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alter_ds.config import ExperimentConfig
from alter_ds.errors import AlterDsError


class StageChoiceError(AlterDsError, ValueError):
    """A ``--stage`` that names no stage of the run."""


@dataclass(frozen=True)
class RunLayout:
    root: Path
    stage_names: tuple[str, ...]

    @classmethod
    def of(cls, config: ExperimentConfig, root: str | Path | None = None) -> RunLayout:
        """The layout of ``config``'s run: ``<training.output_dir>/<run_name>`` unless ``root`` is given."""
        where = Path(root) if root is not None else Path(config.training.output_dir) / config.run_name
        return cls(where, tuple(stage.name for stage in config.stages))

    # ----------------------------------------------------------------------------------- stages
    def stage_index(self, choice: str) -> int:
        """A stage by its name or its 1-based number; one message for anything else."""
        names = list(self.stage_names)
        if choice in names:
            return names.index(choice)
        if choice.isdigit() and 1 <= int(choice) <= len(names):
            return int(choice) - 1
        raise StageChoiceError(f"--stage {choice}: choose 1..{len(names)}, a stage name {names}, or all")

    def select(self, choice: str) -> list[int]:
        """``all`` or one stage (``stage_index``)."""
        if not self.stage_names:
            raise StageChoiceError("the config lists no stages")
        return list(range(len(self.stage_names))) if choice == "all" else [self.stage_index(choice)]

    # ------------------------------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def deepspeed_config_file(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tb"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def routing_file(self, name: str) -> Path:
        """The routing an evaluation named ``name`` saw (a stage's name: its dev evaluation at the end)."""
        return self.eval_dir / f"{name}_routing.json"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def export_dir(self, task: str, format: str) -> Path:
        """Where ``alter-ds export`` writes one task in one format by default."""
        return self.root / "export" / f"{task}_{format}"

    def stage_dir(self, index: int) -> Path:
        return self.root / f"stage{index + 1}"

    def checkpoints(self, index: int) -> Path:
        return self.stage_dir(index) / "checkpoints"

    def model_dir(self, index: int) -> Path:
        return self.stage_dir(index) / "model"

    def metrics_file(self, index: int) -> Path:
        return self.stage_dir(index) / "metrics.jsonl"

    def summary_file(self, index: int) -> Path:
        return self.stage_dir(index) / "summary.json"

    def stage_finished(self, index: int) -> bool:
        """The stage wrote its summary and exported its model (the last two things it does)."""
        return self.summary_file(index).is_file() and (self.model_dir(index) / "mta_config.json").is_file()
