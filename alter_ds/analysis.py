"""What a router learned: the task x (layer, expert) routing of a stage, read against the tasks' declared
categories.

The trainer saves each stage's routing on the dev set (``eval/<stage>_routing.json``: the mean routing weight
of each task over each expert of each layer). From it this module computes:

- each task's routing vector (its rows of every layer, side by side) and a hierarchical clustering of the
  tasks by those vectors (average linkage, Euclidean), cut into as many clusters as there are categories;
- the agreement of that clustering with the declared categories: adjusted Rand index and normalised mutual
  information (scikit-learn), next to what random routes of the same shape score, so that a value can be
  read against chance rather than against zero;
- per-task routing entropy, per-layer expert balance, and warnings when routing collapses (one expert takes
  most of a layer's traffic for every task).

``routing_heatmap`` draws the matrix with tasks grouped and coloured by category, one column block per
layer, and the clustering's dendrogram beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alter_ds.errors import MissingFileError, UsageError

#: a layer has collapsed when one expert takes at least this share of every task's routing weight
COLLAPSE_SHARE = 0.9
#: random routing matrices scored for the chance level of ARI/NMI
RANDOM_DRAWS = 200


@dataclass
class Routing:
    """A stage's routing: per layer a ``[tasks, experts]`` matrix of mean routing weights."""

    tasks: list[str]
    categories: list[str]
    layers: dict[str, np.ndarray]

    @classmethod
    def read(cls, path: Path, categories: dict[str, str]) -> Routing:
        """``eval/<stage>_routing.json`` as the trainer wrote it; ``categories`` maps task name -> category."""
        if not path.is_file():
            raise MissingFileError(f"no routing at {path}: the stage has not finished (its dev evaluation writes it)")
        try:
            data = json.loads(path.read_text())
            tasks = list(data["tasks"])
            layers = {name: np.asarray(matrix, dtype=np.float64) for name, matrix in data["layers"].items()}
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path}: not a routing file ({type(error).__name__}: {error})") from None
        for name, matrix in layers.items():
            if matrix.ndim != 2 or matrix.shape[0] != len(tasks):
                raise UsageError(f"{path}: layer {name} has shape {matrix.shape} for {len(tasks)} tasks")
        return cls(tasks, [categories.get(task, "default") for task in tasks], layers)

    def shares(self) -> dict[str, np.ndarray]:
        """Each task's row of each layer normalised to sum 1 (a task never routed keeps a zero row)."""
        return {name: matrix / np.maximum(matrix.sum(-1, keepdims=True), 1e-12) for name, matrix in self.layers.items()}

    def vectors(self) -> np.ndarray:
        """``[tasks, sum of experts]``: each task's normalised rows of every layer, side by side."""
        return np.concatenate(list(self.shares().values()), axis=1)


@dataclass
class Analysis:
    """The numbers ``alter-ds analyze`` writes (``analysis.json``); see the module docstring."""

    tasks: list[str]
    categories: list[str]
    clusters: list[int]
    #: agreement of the clustering with the categories; None with fewer than two categories
    adjusted_rand_index: float | None
    normalized_mutual_info: float | None
    #: the same scores for random routes of this shape: mean and 95th percentile over RANDOM_DRAWS draws
    chance: dict[str, float] = field(default_factory=dict)
    task_entropy: dict[str, float] = field(default_factory=dict)
    #: per layer: entropy of the layer's expert traffic over all tasks / log(experts); 1 = perfectly even
    expert_balance: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def cluster_tasks(vectors: np.ndarray, clusters: int) -> list[int]:
    """Average-linkage hierarchical clustering of the rows of ``vectors`` cut into ``clusters`` groups."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if vectors.shape[0] < 2:
        return [1] * vectors.shape[0]
    tree = linkage(vectors, method="average", metric="euclidean")
    return [int(c) for c in fcluster(tree, t=clusters, criterion="maxclust")]


def _entropy(rows: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row, by the routers' own definition (``mixture_entropy``)."""
    import torch

    from alter_ds.mta.routers import mixture_entropy

    return mixture_entropy(torch.from_numpy(np.atleast_2d(rows))).numpy()


def analyze(routing: Routing, seed: int = 0) -> Analysis:
    """Cluster, score against categories and chance, and look for collapse (see the module docstring)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if not routing.layers:
        raise UsageError("the routing has no layers")
    kinds = sorted(set(routing.categories))
    clusters = cluster_tasks(routing.vectors(), max(len(kinds), 1))
    ari = nmi = None
    chance: dict[str, float] = {}
    if len(kinds) >= 2:
        ari = float(adjusted_rand_score(routing.categories, clusters))
        nmi = float(normalized_mutual_info_score(routing.categories, clusters))
        generator = np.random.default_rng(seed)
        scores: dict[str, list[float]] = {"ari": [], "nmi": []}
        for _ in range(RANDOM_DRAWS):
            rows = [generator.dirichlet(np.ones(m.shape[1]), size=m.shape[0]) for m in routing.layers.values()]
            drawn = cluster_tasks(np.concatenate(rows, axis=1), len(kinds))
            scores["ari"].append(adjusted_rand_score(routing.categories, drawn))
            scores["nmi"].append(normalized_mutual_info_score(routing.categories, drawn))
        for name, values in scores.items():
            chance[f"{name}_mean"] = float(np.mean(values))
            chance[f"{name}_p95"] = float(np.percentile(values, 95))
    shares = routing.shares()
    entropies = np.stack([_entropy(s) for s in shares.values()])  # [layers, tasks]
    task_entropy = {task: float(entropies[:, i].mean()) for i, task in enumerate(routing.tasks)}
    balance: dict[str, float] = {}
    warnings: list[str] = []
    for name, share in shares.items():
        routed = share.sum(-1) > 0
        experts = share.shape[1]
        if not routed.any():
            continue
        traffic = share[routed].mean(0)
        balance[name] = max(0.0, float(_entropy(traffic[None])[0] / math.log(experts))) if experts > 1 else 1.0
        top = share[routed].argmax(-1)
        if experts > 1 and len(set(top.tolist())) == 1 and bool((share[routed].max(-1) >= COLLAPSE_SHARE).all()):
            warnings.append(
                f"layer {name}: expert {int(top[0])} takes >= {COLLAPSE_SHARE:.0%} of every task's routing "
                f"(collapsed: the layer's other experts are unused)"
            )
    return Analysis(routing.tasks, routing.categories, clusters, ari, nmi, chance, task_entropy, balance, warnings)


def routing_heatmap(routing: Routing, title: str | None = None) -> Any:
    """The task x (layer, expert) matrix with tasks grouped and coloured by category (left), one column block
    per layer with layer names every few blocks so that 30 layers stay readable, and the dendrogram of the
    clustering (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram, linkage

    order = sorted(range(len(routing.tasks)), key=lambda i: (routing.categories[i], routing.tasks[i]))
    matrix = routing.vectors()[order]
    widths = [m.shape[1] for m in routing.layers.values()]
    kinds = sorted(set(routing.categories))
    palette = plt.get_cmap("tab10")
    colour = {kind: palette(i % 10) for i, kind in enumerate(kinds)}
    height = max(3.0, 0.3 * len(order) + 1.6)
    heat_width = min(max(2.5, 0.12 * matrix.shape[1]), 18.0)
    figure = plt.figure(figsize=(heat_width + 6.0, height + 0.5), constrained_layout=True)
    grid = figure.add_gridspec(1, 2, width_ratios=[heat_width + 2.0, 4.0])
    axis = figure.add_subplot(grid[0])
    image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.set_yticks(range(len(order)), [routing.tasks[i] for i in order], fontsize=7)
    for label, index in zip(axis.get_yticklabels(), order):
        label.set_color(colour[routing.categories[index]])
    edges = np.cumsum([0, *widths])
    for edge in edges[1:-1]:
        axis.axvline(edge - 0.5, color="white", linewidth=0.6)
    names = list(routing.layers)
    every = max(1, math.ceil(len(names) / 15))
    centres = [(edges[i] + edges[i + 1] - 1) / 2 for i in range(len(names))]
    axis.set_xticks(centres[::every], names[::every], rotation=90, fontsize=6)
    axis.set_xlabel("layer (one block of experts each)")
    bounds = np.cumsum([0] + [sum(1 for i in order if routing.categories[i] == k) for k in kinds])
    for bound in bounds[1:-1]:
        axis.axhline(bound - 0.5, color="white", linewidth=1.2)
    figure.colorbar(image, ax=axis, fraction=0.03, label="share of the task's routing weight")
    handles = [matplotlib.patches.Patch(color=colour[k], label=k) for k in kinds]
    axis.legend(
        handles=handles,
        title="category",
        fontsize=7,
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.08, 1.0),
        frameon=False,
    )
    tree_axis = figure.add_subplot(grid[1])
    if len(order) >= 2:
        tree = linkage(routing.vectors(), method="average", metric="euclidean")
        drawn = dendrogram(
            tree,
            orientation="right",
            labels=routing.tasks,
            ax=tree_axis,
            color_threshold=0,
            above_threshold_color="0.3",
        )
        for label in tree_axis.get_yticklabels():
            label.set_color(colour[routing.categories[routing.tasks.index(label.get_text())]])
            label.set_fontsize(7)
        del drawn
    tree_axis.set_title("clustering by routing", fontsize=8)
    tree_axis.set_xticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def analyze_run(run_dir: str | Path, stage: str | None = None) -> tuple[Analysis, list[Path]]:
    """``alter-ds analyze``: a finished stage's dev routing (default: the last stage) analysed; writes
    ``analysis/<stage>/analysis.json`` and ``routing.png`` in the run, and the figure and scores to its
    TensorBoard log (``analysis/<stage>/...``). Returns the analysis and the files written."""
    from alter_ds.config import ExperimentConfig, load_config
    from alter_ds.run import RunLayout

    root = Path(run_dir)
    config: ExperimentConfig = load_config(root / "config.yaml")
    layout = RunLayout.of(config, root)
    index = len(layout.stage_names) - 1 if stage is None else layout.stage_index(stage)
    name = layout.stage_names[index]
    routing = Routing.read(layout.routing_file(name), category_map(config.tasks))
    result = analyze(routing, seed=config.seed)
    out = layout.analysis_dir / name
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "analysis.json", out / "routing.png"]
    written[0].write_text(result.to_json())
    figure = routing_heatmap(routing, f"{config.run_name}, {name}: routing on the dev set")
    figure.savefig(written[1], dpi=120)
    from torch.utils.tensorboard import SummaryWriter

    step = config.stages[index].steps
    with SummaryWriter(str(layout.tensorboard_dir)) as writer:
        writer.add_figure(f"analysis/{name}/routing", figure, step)  # closes the figure
        if result.adjusted_rand_index is not None and result.normalized_mutual_info is not None:
            writer.add_scalar(f"analysis/{name}/adjusted_rand_index", result.adjusted_rand_index, step)
            writer.add_scalar(f"analysis/{name}/normalized_mutual_info", result.normalized_mutual_info, step)
        for task, entropy in result.task_entropy.items():
            writer.add_scalar(f"analysis/{name}/entropy/{task}", entropy, step)
    return result, written


def format_analysis(result: Analysis) -> str:
    """The few lines ``alter-ds analyze`` prints."""
    lines = []
    if result.adjusted_rand_index is not None and result.normalized_mutual_info is not None:
        lines.append(
            f"clustering by routing vs categories: ARI {result.adjusted_rand_index:.3f} "
            f"(random routes: mean {result.chance['ari_mean']:.3f}, p95 {result.chance['ari_p95']:.3f}), "
            f"NMI {result.normalized_mutual_info:.3f} (random: mean {result.chance['nmi_mean']:.3f}, "
            f"p95 {result.chance['nmi_p95']:.3f})"
        )
    else:
        lines.append("one category only: no agreement score (declare task categories to get ARI/NMI)")
    groups: dict[int, list[str]] = {}
    for task, cluster in zip(result.tasks, result.clusters):
        groups.setdefault(cluster, []).append(task)
    lines.append("clusters: " + "; ".join(", ".join(tasks) for tasks in groups.values()))  # in task order
    width = max(len(t) for t in result.tasks)
    lines.append(f"{'task':<{width}}  category        entropy (nats, mean over layers)")
    for task, category in zip(result.tasks, result.categories):
        lines.append(f"{task:<{width}}  {category:<15} {result.task_entropy[task]:.3f}")
    balance = list(result.expert_balance.values())
    if balance:
        lines.append(f"expert balance per layer (1 = even): min {min(balance):.2f}, mean {np.mean(balance):.2f}")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def category_map(tasks: Sequence[Any]) -> dict[str, str]:
    """task name -> declared category, from task configs."""
    return {task.name: task.category for task in tasks}
