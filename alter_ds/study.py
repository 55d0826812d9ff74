"""``alter-ds study STUDY.yaml``: arms x seeds as ordinary runs, all scored on the same test examples.

A study names a base experiment (model, tasks, data, training: what every arm shares) and its arms. An arm
takes its method (``mta`` and ``stages``) from a YAML file, e.g. a preset or ``configs/arms/*.yaml``, and
may override any part of the result (``stages`` and ``tasks`` by name). Each (arm, seed) becomes an
experiment config under ``<output_dir>/<study>/configs/`` and a run directory under ``runs/``, trained by
the normal trainer through the DeepSpeed launcher, then evaluated on the first ``eval.max_examples`` test
examples of every task — the same examples for every arm and seed.

The study is resumable: a run with its evaluation on disk is skipped, a run killed mid-training resumes
from its checkpoint (the trainer's ``--resume auto``), and a run whose config changed since it ran is an
error rather than a silent mix of old and new results. ``report`` then writes ``results.json``,
``results.md`` and the figures from whatever has finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alter_ds.config import (
    PLAIN_NAME,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    expand_task_suite,
    load_config,
    require,
)
from alter_ds.config import merge as merge_configs
from alter_ds.errors import AlterDsError
from alter_ds.launch import has_cuda, launcher_command, launcher_env
from alter_ds.run import RunLayout

STUDY_EVAL_FILE = "study_eval.json"
REPO = Path(__file__).resolve().parents[1]


class StudyError(AlterDsError, RuntimeError):
    """A study that cannot go on; the message names the arm, run or file."""


# ------------------------------------------------------------------------------------------- config
@dataclass
class ArmConfig:
    """One arm: a method file and overrides, run once per seed."""

    name: str
    #: a YAML file whose ``mta`` and ``stages`` are the arm's method (other sections are ignored)
    method: str | None = None
    #: merged into the experiment; ``stages`` and ``tasks`` as mappings by name, e.g. {stages: {stage1: {steps: 50}}}
    overrides: dict[str, Any] = field(default_factory=dict)
    #: seeds of this arm (default: the study's)
    seeds: list[int] | None = None
    #: which stages' models to score (default: the study's eval.stages)
    eval_stages: Literal["last", "all"] | None = None

    def validate(self) -> None:
        require(bool(PLAIN_NAME.fullmatch(self.name)), "name", "a plain name (letters, -, _)")
        require(self.seeds is None or len(self.seeds) > 0, "seeds", "list at least one seed")


@dataclass
class StudyEvalConfig:
    split: Literal["dev", "test"] = "test"
    #: the first this many examples of each task's split (every arm and seed sees the same ones)
    max_examples: int | None = 200
    #: the seed the split is loaded with (builders generate from it; file splits are fixed)
    seed: int = 0
    batch_size: int = 16
    #: evaluate the backbone once as a reference row
    backbone: bool = True
    #: evaluate every stage's model (stage 1 and stage 2 of two-stage arms) or only the last
    stages: Literal["last", "all"] = "all"

    def validate(self) -> None:
        require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class StudyConfig:
    """A study file: see the module docstring."""

    name: str
    #: the experiment every arm starts from (model, tasks, data, training)
    base: str
    arms: list[ArmConfig]
    #: ARG of every arm is against this arm's mean
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0])
    #: merged into the base before the arm (e.g. training sizes for this study)
    base_overrides: dict[str, Any] = field(default_factory=dict)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    #: processes per run (GPUs, or CPU ranks)
    ranks: int = 1
    output_dir: str = "studies"
    #: a study file this one adds to (see ``load_study``); resolved when the study is loaded
    extends: str | None = None

    def validate(self) -> None:
        names = [arm.name for arm in self.arms]
        require(bool(names), "arms", "list at least one arm")
        for index, name in enumerate(names):
            require(name not in names[:index], ("arms", index, "name"), f"duplicate arm {name!r}")
        require(self.baseline in names, "baseline", f"unknown arm {self.baseline!r}; arms are {names}")
        require(bool(self.seeds), "seeds", "list at least one seed")
        require(self.ranks >= 1, "ranks", "must be >= 1")

    def arm_seeds(self, arm: ArmConfig) -> list[int]:
        return list(arm.seeds if arm.seeds is not None else self.seeds)


# ------------------------------------------------------------------------------------ composition
def merge(base: Any, override: Any, where: str) -> Any:
    """``alter_ds.config.merge`` with its errors as a ``StudyError`` (they name the arm's overrides)."""
    try:
        return merge_configs(base, override, where)
    except ConfigError as error:
        raise StudyError(error.detail) from None


def _find(path: str, study_file: Path) -> Path:
    """A path as given (relative to where the study runs), else relative to the study file."""
    for candidate in (Path(path), study_file.parent / path):
        if candidate.is_file():
            return candidate
    raise StudyError(f"{study_file}: {path} not found (relative to {Path.cwd()} or {study_file.parent})")


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping at the top")
    return data


def _study_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A study file's data with what it ``extends`` folded in (``load_study``)."""
    if path.resolve() in seen:
        raise StudyError(f"{path}: extends itself through {' -> '.join(str(p) for p in seen)}")
    data = _read_yaml(path)
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise StudyError(f"{path}: extends: expected the path of a study file, got {parent_name!r}")
    parent = _study_data(_find(parent_name, path), (*seen, path.resolve()))
    arms = list(parent.get("arms") or [])
    names = [arm.get("name") if isinstance(arm, dict) else None for arm in arms]
    for arm in data.pop("arms", None) or []:
        name = arm.get("name") if isinstance(arm, dict) else None
        if name in names:  # the parent's arm, changed (say, more seeds)
            arms[names.index(name)] = merge(arms[names.index(name)], arm, f"{path}: arm {name}")
        else:
            arms.append(arm)
    return {**merge(parent, data, str(path)), "arms": arms}


def load_study(path: Path) -> StudyConfig:
    """A study file, validated. One that ``extends: OTHER.yaml`` is that study and more: it has the other's
    settings unless it gives them, the name included (keep it: the two then share a directory, and what the
    other finished is not run again), and the other's arms, in order, each merged with an arm of the same name
    here (``seeds: [0, 1]`` gives it a second seed); arms with new names follow. Paths in either file resolve
    as in ``_find``, relative to the file that extends."""
    if "extends" not in _read_yaml(path):
        return load_config(path, StudyConfig)  # errors name the line
    try:
        return config_from_dict(StudyConfig, _study_data(path), str(path))
    except ConfigError as error:
        raise StudyError(str(error)) from None


@dataclass
class Run:
    arm: str
    seed: int
    name: str
    config_path: Path
    run_dir: Path


class Study:
    """A loaded study: its config, where it lives, and the runs it consists of."""

    def __init__(self, path: str | Path):
        self.file = Path(path)
        self.config: StudyConfig = load_study(self.file)
        self.root = Path(self.config.output_dir) / self.config.name
        base = expand_task_suite(_read_yaml(_find(self.config.base, self.file)))  # overrides name its tasks
        self.base = merge(base, self.config.base_overrides, "base_overrides")
        self.experiments: dict[tuple[str, int], ExperimentConfig] = {}
        self.runs: list[Run] = []
        seeds = sorted({seed for arm in self.config.arms for seed in self.config.arm_seeds(arm)})
        # seed by seed, so that a study cut short has every arm once before it has any arm twice
        for seed, arm in ((s, a) for s in seeds for a in self.config.arms if s in self.config.arm_seeds(a)):
            name = f"{arm.name}-seed{seed}"
            self.experiments[(arm.name, seed)] = self._compose(arm, seed, name)
            self.runs.append(
                Run(arm.name, seed, name, self.root / "configs" / f"{name}.yaml", self.root / "runs" / name)
            )

    def _compose(self, arm: ArmConfig, seed: int, name: str) -> ExperimentConfig:
        data = dict(self.base)
        if arm.method is not None:
            method = _read_yaml(_find(arm.method, self.file))
            if "stages" not in method:
                raise StudyError(f"{self.file}: arm {arm.name!r}: {arm.method} has no stages")
            data["mta"] = method.get("mta", {})
            data["stages"] = method["stages"]
        data = merge(data, arm.overrides, f"arm {arm.name}.overrides")
        data.update(run_name=name, seed=seed)
        data["training"] = dict(data.get("training") or {}, output_dir=str(self.root / "runs"))
        try:
            return config_from_dict(ExperimentConfig, data, f"{self.file} (arm {arm.name}, seed {seed})")
        except ConfigError as error:
            raise StudyError(str(error)) from None

    # -------------------------------------------------------------------------------- running
    def run(self, log: Any = print) -> None:
        """Train and evaluate every run that has not finished, then write the report."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.config.eval.backbone:
            self._evaluate_backbone(log)
        for number, run in enumerate(self.runs, start=1):
            label = f"[{number}/{len(self.runs)}] {run.name}"
            if self._finished(run):
                log(f"{label}: done earlier, skipped")
                continue
            self._write_config(run)
            started = time.perf_counter()
            if self._trained(run):  # scored under other evaluation settings: score it again, keep the training
                log(f"{label}: trained earlier; its scores were for other evaluation settings")
            else:
                log(f"{label}: training ({run.run_dir / 'train.log'})")
                self._train(run)
            log(f"{label}: evaluating on {self._eval_description()}")
            self._evaluate(run, time.perf_counter() - started)
            log(f"{label}: finished in {_minutes(time.perf_counter() - started)}")
        report(self)
        log(f"report: {self.root / 'results.md'}")

    def _eval_description(self) -> str:
        limit = self.config.eval.max_examples
        return f"{'all' if limit is None else f'the first {limit}'} {self.config.eval.split} examples of each task"

    def scored_as(self, run: Run) -> dict[str, Any]:
        """What the study asks a run's scores to be of; a record scored otherwise (say, on 100 examples
        where the study now asks for 200) is stale. The batch size changes the cost only, so it is left out."""
        config = self.experiments[(run.arm, run.seed)]
        arm = next(a for a in self.config.arms if a.name == run.arm)
        names = [stage.name for stage in config.stages]
        settings = self.config.eval
        return {
            "split": settings.split,
            "max_examples": settings.max_examples,
            "seed": settings.seed,
            "stages": names[-1:] if (arm.eval_stages or settings.stages) == "last" else names,
        }

    def record(self, run: Run) -> dict[str, Any] | None:
        """The run's scores, if it has them for the evaluation the study asks for now."""
        return _scores_if_current(run.run_dir / "eval" / STUDY_EVAL_FILE, self.scored_as(run))

    def _finished(self, run: Run) -> bool:
        if self.record(run) is None:
            return False
        self._check_unchanged(run)
        return True

    def _trained(self, run: Run) -> bool:
        layout = RunLayout.of(self.experiments[(run.arm, run.seed)])
        return all(layout.stage_finished(index) for index in range(len(layout.stage_names)))

    def _config_text(self, run: Run) -> str:
        return yaml.safe_dump(dataclasses.asdict(self.experiments[(run.arm, run.seed)]), sort_keys=False)

    def _check_unchanged(self, run: Run) -> None:
        """The saved config, read with today's defaults, must equal the arm's: a key a newer alter-ds added
        with its default does not count as a change, a changed value or a key it no longer knows does."""
        if not run.config_path.is_file():
            return
        current = dataclasses.asdict(self.experiments[(run.arm, run.seed)])
        try:
            saved = dataclasses.asdict(load_config(run.config_path))
        except ConfigError:
            saved = None
        if saved != current:
            raise StudyError(
                f"arm {run.arm!r} seed {run.seed}: its config changed since it ran ({run.config_path}); "
                f"rename the arm, or delete {run.run_dir} and {run.config_path} to run it again"
            )

    def _write_config(self, run: Run) -> None:
        self._check_unchanged(run)
        _write_atomic(run.config_path, self._config_text(run))

    def _train(self, run: Run) -> None:
        ranks = self.config.ranks
        train_args = ["--config", str(run.config_path), "--stage", "all"]
        command = launcher_command(train_args, ranks, master_port=29500 + os.getpid() % 400)
        env = launcher_env(ranks)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with (run.run_dir / "train.log").open("a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            code = subprocess.call(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if code != 0:
            tail = (run.run_dir / "train.log").read_text().splitlines()[-15:]
            raise StudyError(
                f"run {run.name} failed (exit {code}); the end of {run.run_dir / 'train.log'}:\n" + "\n".join(tail)
            )

    def _evaluate(self, run: Run, train_seconds: float) -> None:
        config = self.experiments[(run.arm, run.seed)]
        scored_as = self.scored_as(run)
        results: dict[str, Any] = {}
        layout = RunLayout.of(config)
        for name in scored_as["stages"]:
            results[name] = self._score(config, layout.model_dir(layout.stage_index(name)))
        summaries = {name: json.loads(layout.summary_file(i).read_text()) for i, name in enumerate(layout.stage_names)}
        record = {
            "arm": run.arm,
            "seed": run.seed,
            "split": self.config.eval.split,
            "scored_as": scored_as,
            "final_stage": config.stages[-1].name,
            "stages": results,
            "seconds": round(train_seconds, 1),  # this invocation's launch to exported model (0-ish if resumed)
            # time in optimizer steps, every stage, over every resume (None when a stage's summary predates it)
            "train_seconds": _sum_or_none([summary.get("train_seconds") for summary in summaries.values()]),
            "trainable_parameters": {
                name: sum(g["trainable"] for g in summary["parameters"].values()) for name, summary in summaries.items()
            },
            "mean_step_seconds": {name: summary.get("mean_step_seconds") for name, summary in summaries.items()},
        }
        _write_atomic(run.run_dir / "eval" / STUDY_EVAL_FILE, json.dumps(record, indent=2))

    def backbone_scored_as(self) -> dict[str, Any]:
        settings = self.config.eval
        return {"split": settings.split, "max_examples": settings.max_examples, "seed": settings.seed}

    def backbone_record(self) -> dict[str, Any] | None:
        """The backbone's scores, if they are for the evaluation the study asks for now."""
        return _scores_if_current(self.root / "backbone_eval.json", self.backbone_scored_as())

    def _evaluate_backbone(self, log: Any) -> None:
        out = self.root / "backbone_eval.json"
        if self.backbone_record() is not None:
            return
        log(f"backbone: evaluating on {self._eval_description()}")
        config = next(iter(self.experiments.values()))
        config = dataclasses.replace(
            config, mta=dataclasses.replace(config.mta, layers="none", encoder_layers=None, decoder_layers=None)
        )
        record = {"scored_as": self.backbone_scored_as(), **self._score(config, None)}
        _write_atomic(out, json.dumps(record, indent=2))

    def _score(self, config: ExperimentConfig, model_dir: Path | None) -> dict[str, Any]:
        """Per-task results of one model on the study's examples, and its mean routing per task and layer."""
        import transformers

        from alter_ds.data.tasks import load_split
        from alter_ds.evaluate import evaluate
        from alter_ds.mta.backbone import load_tokenizer
        from alter_ds.mta.model import MTAModel, build_model

        settings = self.config.eval
        transformers.utils.logging.disable_progress_bar()
        tokenizer = load_tokenizer(config.model)
        model = build_model(config) if model_dir is None else MTAModel.from_pretrained(model_dir)
        if has_cuda():  # the study's own process scores on the first GPU; training used the launcher's ranks
            model = model.to("cuda")
        examples = {
            task.name: load_split(task, settings.split, config.data.root, settings.seed).examples[
                : settings.max_examples
            ]
            for task in config.tasks
        }
        results = evaluate(
            model, tokenizer, config.tasks, examples, model.is_encoder_decoder, settings.batch_size, None
        )
        routing = {name: block.usage().tolist() for name, block in model.blocks.items()}
        return {"tasks": results, "routing": routing}


def _scores_if_current(path: Path, scored_as: dict[str, Any]) -> dict[str, Any] | None:
    """The scores saved at ``path``, or None when there are none or they were made under other settings."""
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record if record.get("scored_as") == scored_as else None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.replace(path)


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else round(sum(v for v in values if v is not None), 1)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


# --------------------------------------------------------------------------------------- results
def average_relative_gain(scores: dict[str, float], baseline: dict[str, float]) -> float:
    """ARG: the mean over tasks of (score - baseline) / baseline (CrossTaskMoE's transfer score)."""
    tasks = [task for task in baseline if task in scores]
    if not tasks:
        raise ValueError("ARG needs at least one task scored by both")
    for task in tasks:
        if baseline[task] == 0:
            raise ValueError(f"ARG is undefined: the baseline scores 0 on task {task!r}")
    return sum((scores[task] - baseline[task]) / baseline[task] for task in tasks) / len(tasks)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def collect(study: Study) -> dict[str, Any]:
    """Everything finished so far as plain data: per arm and seed, per stage and task, plus means, spreads,
    ARG against the baseline arm's mean and each task's 95% interval half-width at the sample size."""
    settings = study.config.eval
    arms: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    missing: list[str] = []
    for run in study.runs:
        record = study.record(run)
        if record is None:
            missing.append(run.name)
            continue
        arm = arms.setdefault(run.arm, {"seeds": {}, "stages": []})
        arm["seeds"][str(run.seed)] = record
        arm["stages"] = list(record["stages"])
        categories = {t.name: t.category for t in study.experiments[(run.arm, run.seed)].tasks}
        for task, result in record["stages"][record["final_stage"]]["tasks"].items():
            category = categories.get(task, "default")
            tasks[task] = {"metric": result["metric"], "examples": result["examples"], "category": category}
    for task in tasks.values():
        n = task["examples"]
        task["accuracy_95ci_half_width_at_50pct"] = round(100 * 1.96 * math.sqrt(0.25 / n), 2) if n else None
    for arm in arms.values():
        for stage in arm["stages"]:
            per_task = {
                task: [r["stages"][stage]["tasks"][task]["score"] for r in arm["seeds"].values()] for task in tasks
            }
            arm.setdefault("mean", {})[stage] = {t: statistics.fmean(v) for t, v in per_task.items()}
            arm.setdefault("std", {})[stage] = {t: _spread(v) for t, v in per_task.items()}
        arm["final_stage"] = arm["stages"][-1]
    baseline = arms.get(study.config.baseline)
    excluded: list[str] = []
    if baseline is not None:
        # a task the baseline scores 0 on has no relative gain: ARG is over the other tasks, and says so
        excluded = [t for t, value in baseline["mean"][baseline["final_stage"]].items() if value == 0]
        reference = {t: v for t, v in baseline["mean"][baseline["final_stage"]].items() if t not in excluded}
        for arm in arms.values():
            for stage in arm["stages"]:
                gains = [
                    average_relative_gain({t: r["stages"][stage]["tasks"][t]["score"] for t in reference}, reference)
                    for r in arm["seeds"].values()
                ]
                arm.setdefault("arg", {})[stage] = {
                    "mean": statistics.fmean(gains),
                    "std": _spread(gains),
                    "per_seed": gains,
                }
    backbone_record = study.backbone_record()
    backbone = backbone_record["tasks"] if backbone_record else None
    return {
        "study": study.config.name,
        "baseline": study.config.baseline,
        "split": settings.split,
        "max_examples": settings.max_examples,
        "tasks": tasks,
        "arg_excluded_tasks": excluded,
        "backbone": {t: r["score"] for t, r in backbone.items()} if backbone else None,
        "arms": arms,
        "runs_missing": missing,
    }


def report(study: Study) -> dict[str, Any]:
    """Write results.json, results.md and the figures from the finished runs; returns the results."""
    from alter_ds.study_report import best_routing_analysis, write_figures, write_markdown

    results = collect(study)
    results["routing_analysis"] = best_routing_analysis(results)
    _write_atomic(study.root / "results.json", json.dumps(_without_nan(results), indent=2))
    figures = write_figures(study, results)
    _write_atomic(study.root / "results.md", write_markdown(results, figures))
    return results


PUBLISH_BEGIN = "<!-- study results: begin (written by alter-ds study --publish) -->"
PUBLISH_END = "<!-- study results: end -->"


def publish(study: Study, target: Path) -> None:
    """Put the study's report into a document: the text between the markers is replaced by results.md (the
    rest of the document, its prose, stays) and the figures are copied into ``<target stem>/`` beside it."""
    report_text = (study.root / "results.md").read_text() if (study.root / "results.md").is_file() else None
    if report_text is None:
        raise StudyError(f"{study.root / 'results.md'} does not exist: run the study (or --report-only) first")
    figures = target.parent / target.stem
    figures.mkdir(parents=True, exist_ok=True)
    for png in sorted(study.root.glob("*.png")):
        shutil.copyfile(png, figures / png.name)
        report_text = report_text.replace(f"]({png.name})", f"]({target.stem}/{png.name})")
    report_text = report_text.replace("# Study `", "## Study `", 1)
    block = f"{PUBLISH_BEGIN}\n{report_text.strip()}\n{PUBLISH_END}"
    document = target.read_text() if target.is_file() else f"{PUBLISH_BEGIN}\n{PUBLISH_END}\n"
    if PUBLISH_BEGIN not in document or PUBLISH_END not in document:
        raise StudyError(f"{target}: no study markers; add the lines {PUBLISH_BEGIN!r} and {PUBLISH_END!r}")
    before, rest = document.split(PUBLISH_BEGIN, 1)
    _, after = rest.split(PUBLISH_END, 1)
    _write_atomic(target, before + block + after)


def _without_nan(value: Any) -> Any:
    """JSON has no NaN: a spread over one seed is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value
