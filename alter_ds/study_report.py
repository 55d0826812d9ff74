"""A study's tables and figures, from the plain results that ``study.collect`` gathers.

Markdown: the headline (ARG of each arm against the baseline, with the seed spread), per-task scores
(mean ± std over seeds), per-task deltas against the baseline, and what the second stage of two-stage arms
adds, and how the best routing arm's routes relate to the tasks' declared categories (``alter_ds.analysis``).
Figures (PNG): per-task bars with the seed spread, training loss per arm, and the routing of the best arm that
routes between experts (per layer, and grouped by category with the clustering beside it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MTA_MIN_EXPERTS = 2  # an arm "routes" when its final model mixes at least this many experts in a layer


def _cell(mean: float, std: float | None, digits: int = 1) -> str:
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _arg_cell(arg: dict[str, Any]) -> str:
    return _cell(100 * arg["mean"], None if math.isnan(arg["std"]) else 100 * arg["std"], 2)


def write_markdown(results: dict[str, Any], figures: dict[str, str]) -> str:
    arms = results["arms"]
    tasks = results["tasks"]
    baseline = results["baseline"]
    examples = sorted({t["examples"] for t in tasks.values()})
    lines = [
        f"# Study `{results['study']}`",
        "",
        f"Split: {results['split']}, {', '.join(map(str, examples))} examples per task (the same for every arm "
        f"and seed). ARG: mean over tasks of (score − baseline) / baseline, against the mean of `{baseline}` "
        "over its seeds, in %; ± is the standard deviation over seeds.",
        "",
    ]
    if results["arg_excluded_tasks"]:
        lines += [f"ARG leaves out {', '.join(results['arg_excluded_tasks'])}: the baseline scores 0 there.", ""]
    if results["runs_missing"]:
        lines += [f"Not finished yet: {', '.join(results['runs_missing'])}.", ""]
    lines += [
        "| arm | seeds | ARG vs baseline (%) | trainable parameters (per stage) | minutes in training steps per run |",
        "|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        final = arm["final_stage"]
        records = list(arm["seeds"].values())
        trainable = " + ".join(f"{n:,}" for n in records[0]["trainable_parameters"].values())
        arg = _arg_cell(arm["arg"][final]) if "arg" in arm else "-"
        lines.append(f"| {name} | {len(records)} | {arg} | {trainable} | {_training_minutes(records)} |")
    header = ["task", "metric", *(["backbone"] if results["backbone"] else []), *arms]
    lines += ["", "## Per task (final stage of each arm)", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for task, info in tasks.items():
        cells = [task, info["metric"]]
        if results["backbone"]:
            cells.append(f"{results['backbone'][task]:.1f}")
        for arm in arms.values():
            final = arm["final_stage"]
            cells.append(_cell(arm["mean"][final][task], arm["std"][final][task]))
        lines.append("| " + " | ".join(cells) + " |")
    if baseline in arms:
        reference = arms[baseline]["mean"][arms[baseline]["final_stage"]]
        others = [name for name in arms if name != baseline]
        lines += ["", f"## Per-task difference from `{baseline}` (points)", ""]
        lines += ["| task | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for task in tasks:
            deltas = [arms[n]["mean"][arms[n]["final_stage"]][task] - reference[task] for n in others]
            lines.append(f"| {task} | " + " | ".join(f"{d:+.1f}" for d in deltas) + " |")
    staged = {name: arm for name, arm in arms.items() if len(arm["stages"]) > 1}
    if staged:
        lines += ["", "## What each stage adds (two-stage arms)", ""]
        lines += ["| arm | stage | ARG vs baseline (%) |", "|---|---|---|"]
        for name, arm in staged.items():
            for stage in arm["stages"]:
                lines.append(f"| {name} | {stage} | {_arg_cell(arm['arg'][stage]) if 'arg' in arm else '-'} |")
    lines += _routing_lines(results.get("routing_analysis"))
    half_widths = {t["accuracy_95ci_half_width_at_50pct"] for t in tasks.values()}
    lines += [
        "",
        f"Sampling error: at n = {', '.join(map(str, examples))} an accuracy near 50% has a 95% interval of "
        f"± {', '.join(f'{h:.1f}' for h in sorted(half_widths))} points (1.96·√(p(1−p)/n)); differences smaller "
        "than that are within noise.",
        "",
    ]
    for title, path in figures.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def best_routing_analysis(results: dict[str, Any]) -> dict[str, Any] | None:
    """``alter_ds.analysis`` of the best routing arm's routes (on the study's split) against the categories."""
    import dataclasses

    from alter_ds.analysis import analyze

    best = _best_routing_arm(results)
    if best is None:
        return None
    name, record = best
    final = record["final_stage"]
    routing = _routing_of(results, record)
    return {"arm": name, "seed": record["seed"], "stage": final, **dataclasses.asdict(analyze(routing))}


def _routing_of(results: dict[str, Any], record: dict[str, Any]) -> Any:
    import numpy as np

    from alter_ds.analysis import Routing

    tasks = list(results["tasks"])
    categories = [results["tasks"][t].get("category", "default") for t in tasks]
    matrices = record["stages"][record["final_stage"]]["routing"]
    return Routing(tasks, categories, {layer: np.asarray(m, dtype=np.float64) for layer, m in matrices.items()})


def _routing_lines(analysis: dict[str, Any] | None) -> list[str]:
    if not analysis:
        return []
    lines = ["", f"## What `{analysis['arm']}` routes by (seed {analysis['seed']}, {analysis['stage']})", ""]
    if analysis["adjusted_rand_index"] is None:
        lines.append("The tasks declare one category only, so there is nothing to score the routes against.")
    else:
        chance = analysis["chance"]
        lines.append(
            "Tasks clustered by their routing vectors (average linkage over every layer's rows), cut into as many "
            f"clusters as there are declared categories: ARI {analysis['adjusted_rand_index']:.3f}, NMI "
            f"{analysis['normalized_mutual_info']:.3f} against the categories. Random routes of the same shape "
            f"score ARI {chance['ari_mean']:.3f} on average (95th percentile {chance['ari_p95']:.3f}), NMI "
            f"{chance['nmi_mean']:.3f} ({chance['nmi_p95']:.3f})."
        )
    groups: dict[int, list[str]] = {}
    for task, cluster in zip(analysis["tasks"], analysis["clusters"]):
        groups.setdefault(cluster, []).append(task)
    lines += ["", "| cluster | tasks (category) |", "|---|---|"]
    category = dict(zip(analysis["tasks"], analysis["categories"]))
    for number, members in enumerate(groups.values(), start=1):
        lines.append(f"| {number} | {', '.join(f'{t} ({category[t]})' for t in members)} |")
    balance = list(analysis["expert_balance"].values())
    if balance:
        lines += [
            "",
            f"Expert balance per layer (1 = every expert gets the same traffic): min {min(balance):.2f}, "
            f"mean {sum(balance) / len(balance):.2f}.",
        ]
    lines += [f"Warning: {w}" for w in analysis["warnings"]]
    return lines


def write_figures(study: Any, results: dict[str, Any]) -> dict[str, str]:
    """The PNGs beside results.md; returns {title: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    if not arms:
        return {}
    root: Path = study.root
    figures: dict[str, str] = {}
    tasks = list(results["tasks"])
    colours = plt.get_cmap("tab10")

    figure, axis = plt.subplots(figsize=(max(7.0, 1.3 * len(tasks) + 2), 4.2))
    width = 0.8 / len(arms)
    for index, (name, arm) in enumerate(arms.items()):
        final = arm["final_stage"]
        xs = [t + (index - (len(arms) - 1) / 2) * width for t in range(len(tasks))]
        means = [arm["mean"][final][t] for t in tasks]
        spreads = [0.0 if math.isnan(arm["std"][final][t]) else arm["std"][final][t] for t in tasks]
        axis.bar(xs, means, width, yerr=spreads, capsize=2, label=name, color=colours(index))
        for record in arm["seeds"].values():
            axis.scatter(
                xs, [record["stages"][final]["tasks"][t]["score"] for t in tasks], s=6, color="black", zorder=3
            )
    if results["backbone"]:
        axis.scatter(range(len(tasks)), [results["backbone"][t] for t in tasks], marker="_", s=400, color="red",
                     label="backbone", zorder=4)  # fmt: skip
    labels = [f"{t}\n({results['tasks'][t]['metric']})" for t in tasks]
    axis.set_xticks(range(len(tasks)), labels, fontsize=7)
    axis.set_ylabel("score (bars: mean over seeds, dots: seeds)")
    axis.legend(fontsize=7, ncol=min(len(arms) + 1, 6), loc="upper center", bbox_to_anchor=(0.5, 1.15))
    figure.tight_layout()
    figure.savefig(root / "per_task.png", dpi=110)
    plt.close(figure)
    figures["per-task scores"] = "per_task.png"

    figure, axis = plt.subplots(figsize=(7.0, 4.0))
    labelled: set[str] = set()
    for run in study.runs:
        curve = _loss_curve(run.run_dir) if run.arm in arms else []
        if curve:
            label = None if run.arm in labelled else run.arm
            labelled.add(run.arm)
            axis.plot(*zip(*curve), color=colours(list(arms).index(run.arm)), linewidth=1, label=label)
    axis.set_xlabel("optimizer step (stages in sequence)")
    axis.set_ylabel("train loss (per logging window)")
    if labelled:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(root / "train_loss.png", dpi=110)
    plt.close(figure)
    figures["training loss"] = "train_loss.png"

    best = _best_routing_arm(results)
    if best is not None:
        import torch

        from alter_ds.logs import routing_figure

        name, record = best
        final = record["stages"][record["final_stage"]]
        usage = {layer: torch.tensor(matrix) for layer, matrix in final["routing"].items()}
        title = f"{name} (seed {record['seed']}, {record['final_stage']}): routing on the {results['split']} set"
        figure = routing_figure(usage, tasks, title)
        figure.savefig(root / "routing.png", dpi=110)
        plt.close(figure)
        figures[f"routing of {name}"] = "routing.png"
        from alter_ds.analysis import routing_heatmap

        figure = routing_heatmap(_routing_of(results, record), f"{name}: routing by category, and its clustering")
        figure.savefig(root / "routing_categories.png", dpi=110)
        plt.close(figure)
        figures[f"routing of {name} by category"] = "routing_categories.png"
    return figures


def _loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(global step, loss) over the run's stages in order; a resumed stage's repeated steps count once."""
    from alter_ds.run import RunLayout

    layout = RunLayout(run_dir, ())
    curve: list[tuple[int, float]] = []
    offset = 0
    index = 0
    while layout.metrics_file(index).is_file():
        points: dict[int, float] = {}
        for line in layout.metrics_file(index).read_text().splitlines():
            record = json.loads(line)
            points[int(record["step"])] = float(record["train/loss"])
        curve += [(offset + step, loss) for step, loss in sorted(points.items())]
        offset += max(points, default=0)
        index += 1
    return curve


def _best_routing_arm(results: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The arm with the highest ARG whose final model mixes experts, and its best seed's record."""
    candidates = []
    for name, arm in results["arms"].items():
        record = next(iter(arm["seeds"].values()))
        routing = record["stages"][record["final_stage"]]["routing"]
        mixes = any(sum(weight > 0 for weight in row) >= MTA_MIN_EXPERTS for m in routing.values() for row in m)
        if routing and mixes and "arg" in arm:
            candidates.append((arm["arg"][arm["final_stage"]]["mean"], name))
    if not candidates:
        return None
    _, name = max(candidates)
    arm = results["arms"][name]
    seeds = arm["seeds"]
    best_seed = max(seeds, key=lambda s: arm["arg"][arm["final_stage"]]["per_seed"][list(seeds).index(s)])
    return name, seeds[best_seed]


def _training_minutes(records: list[dict[str, Any]]) -> str:
    """Mean over seeds of the time spent in optimizer steps ("-" when a run's summaries do not say)."""
    seconds = [float(r["train_seconds"]) for r in records if r.get("train_seconds") is not None]
    if len(seconds) < len(records):
        return "-"
    return f"{sum(seconds) / len(seconds) / 60:.1f}"
