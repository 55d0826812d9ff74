"""TensorBoard logging (rank 0 writes, other ranks are silent): training scalars, per-task losses and eval
metrics, routing summaries (per-task entropy, per-layer entropy and top share) and a routing figure that reads
at a glance, saved beside its full matrix in the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from alter_ds.mta.routers import mixture_entropy


class RunLogger:
    """A SummaryWriter on rank 0; every method is a no-op elsewhere."""

    def __init__(self, directory: Path, rank: int, task_names: list[str]):
        self.rank = rank
        self.task_names = task_names
        self.writer: Any = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(directory))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def routing(
        self, usage: dict[str, torch.Tensor], step: int, prefix: str, heatmap: bool = False, save_to: Path | None = None
    ) -> None:
        """A few charts, not one per layer and expert: each task's routing entropy averaged over layers, and
        per layer the entropy and the largest expert share averaged over tasks. With ``heatmap`` the
        readable routing figure goes to TensorBoard and, with ``save_to``, the figure as PNG and the full
        task x (layer, expert) matrix as JSON beside it."""
        if self.writer is None or not usage:
            return
        for name, value in routing_summary(usage, self.task_names).items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if heatmap:
            figure = routing_figure(usage, self.task_names)
            if save_to is not None:
                save_to.parent.mkdir(parents=True, exist_ok=True)
                figure.savefig(save_to.with_suffix(".png"), dpi=110)
                matrix = {"tasks": self.task_names, "layers": {k: v.tolist() for k, v in usage.items()}}
                save_to.with_suffix(".json").write_text(json.dumps(matrix))
            self.writer.add_figure(f"{prefix}/routing", figure, step)

    def text(self, name: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def routing_summary(usage: dict[str, torch.Tensor], task_names: list[str]) -> dict[str, float]:
    """Scalars that summarise a task x (layer, expert) routing: ``entropy/<task>`` (mean over layers),
    ``layer_entropy/<layer>`` and ``layer_top_share/<layer>`` (mean over the tasks that were routed)."""
    values: dict[str, float] = {}
    per_task: list[list[float]] = [[] for _ in task_names]
    for layer, matrix in usage.items():
        present = matrix.sum(-1) > 0
        if not bool(present.any()):
            continue
        entropy = mixture_entropy(matrix)
        shares = matrix / matrix.sum(-1, keepdim=True).clamp_min(1e-12)
        values[f"layer_entropy/{layer}"] = float(entropy[present].mean())
        values[f"layer_top_share/{layer}"] = float(shares[present].max(-1).values.mean())
        for task in torch.nonzero(present).flatten().tolist():
            per_task[task].append(float(entropy[task]))
    for task, entropies in zip(task_names, per_task):
        if entropies:
            values[f"entropy/{task}"] = sum(entropies) / len(entropies)
    return values


def routing_figure(usage: dict[str, torch.Tensor], task_names: list[str], title: str | None = None) -> Any:
    """Routing that reads at a glance: task x expert averaged over layers (left), and a grid of one small
    task x expert map per layer (right), all on one colour scale of mean routing weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(usage)
    widths = [int(usage[layer].shape[1]) for layer in layers]
    common = max(set(widths), key=widths.count)  # layers of another expert count stay out of the average
    average = torch.stack([usage[layer].float() for layer in layers if usage[layer].shape[1] == common]).mean(0)
    columns = min(len(layers), 6)
    rows = math.ceil(len(layers) / columns)
    height = max(3.0, 0.28 * len(task_names) + 1.5)
    figure = plt.figure(figsize=(4.5 + 1.6 * columns, max(height, 1.4 * rows + 0.8)), constrained_layout=True)
    outer = figure.add_gridspec(1, 2, width_ratios=[1.2, 0.28 * columns * 1.6])
    axis = figure.add_subplot(outer[0])
    image = axis.imshow(average.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_yticks(range(len(task_names)), task_names, fontsize=7)
    axis.set_xticks(range(common), [str(e) for e in range(common)], fontsize=7)
    axis.set_xlabel("expert")
    axis.set_title(f"mean over {sum(w == common for w in widths)} layers", fontsize=9)
    grid = outer[1].subgridspec(rows, columns)
    for index, layer in enumerate(layers):
        small = figure.add_subplot(grid[index // columns, index % columns])
        small.imshow(usage[layer].float().numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        small.set_title(layer, fontsize=6, pad=2)
        small.set_xticks([])
        small.set_yticks([])
    figure.colorbar(image, ax=axis, fraction=0.05, label="mean routing weight")
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
