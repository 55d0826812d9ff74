"""Routing analysis: clustering against categories (ARI/NMI, next to chance), entropy, balance, collapse
warnings, the heatmap, and ``alter-ds analyze`` on a run directory (files, TensorBoard, clear errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from alter_ds import cli
from alter_ds.analysis import COLLAPSE_SHARE, Routing, analyze, routing_heatmap

TASKS = ["a1", "a2", "a3", "b1", "b2", "b3"]
CATEGORIES = ["extract", "extract", "extract", "classify", "classify", "classify"]


def grouped_routing(noise: float = 0.05, seed: int = 0, layers: int = 4, experts: int = 3) -> Routing:
    """Category 'extract' leans on expert 0, 'classify' on expert 1, in every layer, with noise."""
    rng = np.random.default_rng(seed)
    matrices = {}
    for layer in range(layers):
        rows = []
        for category in CATEGORIES:
            row = np.full(experts, 0.1) + rng.uniform(0, noise, experts)
            row[0 if category == "extract" else 1] += 0.8
            rows.append(row / row.sum())
        matrices[f"decoder.{layer}"] = np.array(rows)
    return Routing(list(TASKS), list(CATEGORIES), matrices)


def test_routes_that_follow_the_categories_cluster_into_them():
    result = analyze(grouped_routing())
    assert result.adjusted_rand_index == pytest.approx(1.0)
    assert result.normalized_mutual_info == pytest.approx(1.0)
    assert len(set(result.clusters[:3])) == 1 and len(set(result.clusters[3:])) == 1
    assert result.clusters[0] != result.clusters[3]
    # chance: random routes of this shape (6 tasks, 2 categories) score about 0 on average, and even their
    # 95th percentile stays below agreement
    assert abs(result.chance["ari_mean"]) < 0.15 and result.chance["ari_p95"] < 1.0
    assert result.warnings == []


def test_routes_that_ignore_the_categories_score_at_chance():
    """Routes grouping tasks across categories ({a1, b1}, {a2, b2}, {a3, b3}) cannot agree with them."""
    rng = np.random.default_rng(1)
    matrices = {}
    for layer in range(3):
        rows = []
        for index in range(6):
            row = np.full(3, 0.05) + rng.uniform(0, 0.02, 3)
            row[index % 3] += 0.9
            rows.append(row / row.sum())
        matrices[f"decoder.{layer}"] = np.array(rows)
    result = analyze(Routing(list(TASKS), list(CATEGORIES), matrices))
    assert result.adjusted_rand_index is not None and result.adjusted_rand_index <= result.chance["ari_p95"]


def test_entropy_balance_and_collapse():
    uniform = np.full((6, 4), 0.25)
    collapsed = np.tile([0.02, 0.02, 0.94, 0.02], (6, 1))
    almost = collapsed.copy()
    almost[5] = [0.94, 0.02, 0.02, 0.02]  # one task elsewhere: the layer still routes
    result = analyze(Routing(list(TASKS), list(CATEGORIES), {"l0": uniform, "l1": collapsed, "l2": almost}))
    entropy_collapsed = -(0.94 * math.log(0.94) + 3 * 0.02 * math.log(0.02))
    expected = (math.log(4) + 2 * entropy_collapsed) / 3
    assert result.task_entropy["a1"] == pytest.approx(expected)
    assert result.expert_balance["l0"] == pytest.approx(1.0)
    assert result.expert_balance["l1"] < 0.3
    assert len(result.warnings) == 1
    assert "layer l1: expert 2 takes" in result.warnings[0] and f"{COLLAPSE_SHARE:.0%}" in result.warnings[0]


def test_one_category_has_no_agreement_score():
    routing = grouped_routing()
    routing.categories = ["default"] * 6
    result = analyze(routing)
    assert result.adjusted_rand_index is None and result.normalized_mutual_info is None and result.chance == {}


def test_heatmap_groups_tasks_by_category_and_reads_at_thirty_layers():
    routing = grouped_routing(layers=30, experts=3)
    figure = routing_heatmap(routing, "t")
    heatmap = figure.axes[0]
    labels = [label.get_text() for label in heatmap.get_yticklabels()]
    assert labels == ["b1", "b2", "b3", "a1", "a2", "a3"]  # grouped by category (sorted), then by name
    assert len(heatmap.get_xticklabels()) <= 15  # layer names thinned so 30 stay legible
    assert heatmap.images[0].get_array().shape == (6, 90)


def write_run(root: Path, routing: Routing | None) -> Path:
    """A finished run's directory as far as analyze reads it: config.yaml and the stage's routing file."""
    config = {
        "run_name": "r",
        "model": {"name_or_path": "m"},
        "tasks": [
            {"name": t, "category": c, "builder": "synthetic", "template": "{input}", "target_field": "target"}
            for t, c in zip(TASKS, CATEGORIES)
        ],
        "stages": [{"name": "stage1", "steps": 5}, {"name": "stage2", "steps": 3}],
    }
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    if routing is not None:
        (root / "eval").mkdir()
        matrices = {k: v.tolist() for k, v in routing.layers.items()}
        (root / "eval" / "stage2_routing.json").write_text(json.dumps({"tasks": routing.tasks, "layers": matrices}))
    return root


def test_analyze_command_writes_json_png_and_tensorboard(tmp_path, capsys):
    run = write_run(tmp_path / "run", grouped_routing())
    assert cli.main(["analyze", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "ARI 1.000" in printed and "clusters: a1, a2, a3; b1, b2, b3" in printed
    saved = json.loads((run / "analysis" / "stage2" / "analysis.json").read_text())
    assert saved["adjusted_rand_index"] == pytest.approx(1.0) and saved["categories"] == CATEGORIES
    assert (run / "analysis" / "stage2" / "routing.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert "analysis/stage2/routing" in events.Tags()["images"]
    (ari,) = events.Scalars("analysis/stage2/adjusted_rand_index")
    assert ari.value == pytest.approx(1.0) and ari.step == 3


def test_analyze_names_what_is_missing(tmp_path, capsys):
    run = write_run(tmp_path / "run", None)
    assert cli.main(["analyze", str(run)]) == 2
    error = capsys.readouterr().err
    assert "stage2_routing.json" in error and "has not finished" in error and "Traceback" not in error
    assert cli.main(["analyze", str(run), "--stage", "9"]) == 2
    assert "--stage 9: choose 1..2" in capsys.readouterr().err
    (run / "eval").mkdir()
    (run / "eval" / "stage1_routing.json").write_text("{not json")
    assert cli.main(["analyze", str(run), "--stage", "stage1"]) == 2
    assert "not a routing file" in capsys.readouterr().err
    assert not (run / "analysis" / "stage1").exists()


@pytest.mark.slow
def test_routes_learned_on_the_synthetic_families_cluster_into_them(tmp_path, capsys):
    """A fixed-seed run (2 ranks, tiny random Llama, the 10 synthetic tasks of 3 families): stage 1 trains one
    adapter per task under hard routes, stage 2 learns each task's mixture over all 10 adapters from uniform
    routes. Nothing tells the router the families; tasks of a family end up leaning on each other's adapters.

    Why the threshold is honest: random routes of this shape score ARI 0.14-0.22 at their 95th percentile
    (the analysis draws 200). Over seeds 0-4 this setup scored 0.41, 1.0, 1.0, 0.41, 0.41: where it is not
    perfect, ``uppercase`` (the one task writing capital letters) splits off and the string and rule tasks
    merge, while the arithmetic tasks always form their own cluster. Seed 0 (the default, not a chosen one)
    must beat chance's 95th percentile and reach 0.4. With stage 2 at lr 0.3 for 60 steps instead of 0.1 for
    40, the routes overshoot and scored -0.04 on seeds 0 and 1: what the router learns depends on the budget."""
    pytest.importorskip("deepspeed")
    from tiny_experiment import task_specs, write_tiny_experiment
    from training_runs import finish, launch

    path = write_tiny_experiment(tmp_path, stage1_steps=80, stage2_steps=40)
    config = yaml.safe_load(path.read_text())
    config["tasks"] = task_specs(["string", "arithmetic", "rule"])
    for task in config["tasks"]:
        task["max_examples"] = {"dev": 16}
    config["mta"] = {"expert_kind": "bottleneck", "bottleneck_dim": 8, "num_shared_experts": 0}
    config["stages"][1].update(lr=0.1, router={"kind": "task_weights", "prior_assigned": 0.0, "prior_other": 0.0})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = finish(launch(tmp_path, tmp_path / "runs"))
    assert code == 0, out[-4000:]
    assert cli.main(["analyze", str(tmp_path / "runs" / "tiny"), "--stage", "2"]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "runs" / "tiny" / "analysis" / "stage2" / "analysis.json").read_text())
    assert result["adjusted_rand_index"] > result["chance"]["ari_p95"]
    assert result["adjusted_rand_index"] >= 0.4
    members: dict[int, set[str]] = {}
    for task, cluster in zip(result["tasks"], result["clusters"]):
        members.setdefault(cluster, set()).add(task)
    assert {"add", "subtract", "multiply"} in members.values()
