"""``alter-ds export RUN_DIR --task T --format F``: one task of a finished stage, for serving.

``alter-ds`` writes a single-task alter-ds model (``MTAModel.from_pretrained`` loads it; any expert kind);
``peft`` a standard PEFT LoRA adapter and ``merged`` a plain Hugging Face model with the update in its weights
(both for lora experts only: ``mta/peft_export.py``). The merged directory gets the run's tokenizer too.
"""

from __future__ import annotations

from pathlib import Path

from alter_ds.errors import MissingFileError, UsageError


def export_run(
    run_dir: str | Path, task: str, format: str, stage: str | None = None, out: str | Path | None = None
) -> Path:
    """Export ``task`` of the run's stage (default: the last) and return the directory written."""
    from alter_ds.config import ExperimentConfig, load_config
    from alter_ds.mta.backbone import load_tokenizer
    from alter_ds.mta.model import EXPORT_FORMATS, MTAModel
    from alter_ds.run import RunLayout

    if format not in EXPORT_FORMATS:
        raise UsageError(f"--format {format}: choose one of {', '.join(EXPORT_FORMATS)}")
    root = Path(run_dir)
    if not (root / "config.yaml").is_file():
        raise MissingFileError(f"{root} is not a run directory: config.yaml is missing")
    config: ExperimentConfig = load_config(root / "config.yaml")
    layout = RunLayout(root, tuple(s.name for s in config.stages))
    index = len(layout.stage_names) - 1 if stage is None else layout.stage_index(stage)
    if not layout.stage_finished(index):
        raise MissingFileError(f"stage {layout.stage_names[index]} of {root} has not finished: no model to export")
    if task not in [t.name for t in config.tasks]:
        raise UsageError(f"--task {task}: the run's tasks are {', '.join(t.name for t in config.tasks)}")
    model = MTAModel.from_pretrained(layout.model_dir(index)).eval()
    if format == "peft" and model.backbone_reference is None:
        raise UsageError(
            f"{layout.model_dir(index)}: a stage trained the backbone (it is saved with the model), so an adapter "
            f"over the original backbone would not reproduce the model; export --format merged instead"
        )
    target = Path(out) if out is not None else layout.export_dir(task, format)
    if format == "merged":
        from alter_ds.mta.peft_export import export_merged

        export_merged(model, target, task, load_tokenizer(config.model))
    else:
        model.export_task(target, task, format=format)
    return target
