"""TensorBoard logging (rank 0 writes, other ranks are silent): training scalars, per-task losses and eval
metrics, router entropy and expert usage per layer, and a task x (layer, expert) usage heatmap."""

from __future__ import annotations

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

    def routing(self, usage: dict[str, torch.Tensor], step: int, prefix: str, heatmap: bool = False) -> None:
        """Per-layer entropy of each task's mean routing and per-expert usage, plus the heatmap image."""
        if self.writer is None or not usage:
            return
        for layer, matrix in usage.items():
            present = matrix.sum(-1) > 0
            if not bool(present.any()):
                continue
            entropy = mixture_entropy(matrix[present])
            self.writer.add_scalar(f"{prefix}/router_entropy/{layer}", float(entropy.mean()), step)
            for expert, share in enumerate(matrix[present].mean(0).tolist()):
                self.writer.add_scalar(f"{prefix}/expert_usage/{layer}/expert{expert}", share, step)
        if heatmap:
            self.writer.add_figure(f"{prefix}/usage_heatmap", usage_heatmap(usage, self.task_names), step)

    def text(self, name: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def usage_heatmap(usage: dict[str, torch.Tensor], task_names: list[str]) -> Any:
    """A task x (layer, expert) heatmap of mean routing weights (matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(usage)
    matrix = torch.cat([usage[layer].float() for layer in layers], dim=1).numpy()
    figure, axis = plt.subplots(figsize=(max(4.0, 0.25 * matrix.shape[1] + 2), max(2.5, 0.35 * len(task_names) + 1)))
    image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_yticks(range(len(task_names)), task_names, fontsize=7)
    offsets, start = [], 0
    for layer in layers:
        offsets.append(start + usage[layer].shape[1] / 2 - 0.5)
        start += usage[layer].shape[1]
        axis.axvline(start - 0.5, color="white", linewidth=0.5)
    axis.set_xticks(offsets, layers, rotation=90, fontsize=6)
    axis.set_xlabel("layer (experts within)")
    figure.colorbar(image, ax=axis, fraction=0.03)
    figure.tight_layout()
    return figure
