"""Routers: one interface, per-token ``(expert_ids[N, k], expert_weights[N, k])``.

Example-level routers (hard, task_weights, gate, uniform, fixed, random) compute one choice per example
(``[B, k]``) that the block broadcasts over the example's tokens; the token router decides per token
(``[B, T, k]``). Expert indices run over the whole stack of a block: task experts first, then shared ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from alter_ds.config import RouterConfig
from alter_ds.errors import UsageError


@dataclass
class ExpertLayout:
    """What a router routes over: tasks, task experts (with each task's assignment) and shared experts."""

    num_tasks: int
    num_task_experts: int
    num_shared_experts: int
    task_experts: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.task_experts:
            self.task_experts = [[t % self.num_task_experts] for t in range(self.num_tasks)]
        if len(self.task_experts) != self.num_tasks:
            raise UsageError(f"task_experts lists {len(self.task_experts)} tasks, layout has {self.num_tasks}")

    @property
    def num_experts(self) -> int:
        return self.num_task_experts + self.num_shared_experts

    @property
    def shared_experts(self) -> list[int]:
        return list(range(self.num_task_experts, self.num_experts))


class TaskTableSource(Protocol):
    """Where a task_embedding router finds the model's task-embedding table (the model's routing context)."""

    def task_table(self) -> torch.Tensor: ...


def temperature_at(config: RouterConfig, step: int) -> float:
    """tau_t = max(tau_0 * exp(-r * t), tau_min), t counted in optimizer steps."""
    return max(config.temperature * math.exp(-config.temperature_decay * step), config.min_temperature)


def mixture_entropy(mixture: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a ``[tasks, experts]`` mixture; low means a task commits to few experts."""
    probs = mixture.clamp_min(0)
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _dense_routes(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert with its weight: ids ``arange(E)`` broadcast to the weights' shape."""
    ids = torch.arange(weights.shape[-1], device=weights.device).expand(weights.shape)
    return ids, weights


def _top_k(weights: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest weights, renormalised; straight-through so the kept weights carry gradients."""
    if k is None or k >= weights.shape[-1]:
        return _dense_routes(weights)
    top, ids = weights.topk(k, dim=-1)
    return ids, top / top.sum(-1, keepdim=True).clamp_min(1e-12)


def _relaxed(logits: torch.Tensor, config: RouterConfig, tau: float, training: bool) -> torch.Tensor:
    """softmax / Gumbel-softmax / straight-through hard Gumbel over the last dimension.

    Noise is drawn only in training; at evaluation Gumbel becomes its softmax and straight-through its argmax
    (argmax-only execution, as the task-level MoE does at inference).
    """
    if config.mode == "softmax":
        return F.softmax(logits / tau, dim=-1)
    if not training:
        soft = F.softmax(logits / tau, dim=-1)
        if config.mode == "gumbel":
            return soft
        return F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return F.gumbel_softmax(logits, tau=tau, hard=config.mode == "st_gumbel", dim=-1)


class Router(nn.Module):
    """Base router. ``example_level`` routers return ``[B, k]``; token routers ``[B, T, k]``."""

    example_level = True
    needs_features = False

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int):
        super().__init__()
        self.config = config
        self.layout = layout
        self.width = width

    def forward(
        self, hidden: torch.Tensor, task_ids: torch.Tensor, features: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def task_mixture(self, step: int = 0) -> torch.Tensor | None:
        """Each task's weights over all experts ``[tasks, experts]`` at evaluation; None if input-dependent."""
        return None

    def exported_state(self, task: int, kept: list[int]) -> dict[str, torch.Tensor]:
        """The state of this router kind reduced to one task and the ``kept`` experts (see MTAModel.export_task)."""
        raise NotImplementedError

    def expert_axes(self) -> dict[str, int]:
        """{state key: its axis over the whole expert stack}, so that learned state follows each expert when
        the stack changes shape (a new task expert moves every shared expert up by one)."""
        return {}

    def extra_repr(self) -> str:
        return f"kind={self.config.kind}, experts={self.layout.num_experts}, tasks={self.layout.num_tasks}"


class TaskLevelRouter(Router):
    """A router whose choice depends on the task only: one fixed mixture row per task."""

    def mixture_rows(self, step: int) -> torch.Tensor:
        """``[tasks, experts]`` weights (differentiable where the router learns)."""
        raise NotImplementedError

    def forward(
        self, hidden: torch.Tensor, task_ids: torch.Tensor, features: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.mixture_rows(step).to(hidden.dtype)
        return _sparse_routes(rows[task_ids])

    def task_mixture(self, step: int = 0) -> torch.Tensor:
        with torch.no_grad():
            return self.mixture_rows(step).float()

    def export_as_fixed(self, task: int, kept: list[int], step: int) -> dict[str, torch.Tensor]:
        row = self.task_mixture(step)[task]
        return {"route_weights": row[kept].unsqueeze(0).clone()}


def _sparse_routes(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes over the experts with non-zero weight, padded to the widest row with weight-0 slots.

    A hard or top-1 route then costs one expert per token, not E; the zero-weight padding slots point at
    expert 0 and contribute nothing (and no gradient to the mixture, which is zero there by construction).
    """
    nonzero = weights != 0
    k = max(int(nonzero.sum(-1).max()), 1) if weights.numel() else 1
    if k == weights.shape[-1]:
        return _dense_routes(weights)
    order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :k]
    return order, weights.gather(-1, order)


class HardRouter(TaskLevelRouter):
    """Each example uses its task's assigned expert(s) and the shared experts, uniformly (ALTER stage 1)."""

    route_weights: torch.Tensor

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int):
        super().__init__(config, layout, width)
        rows = torch.zeros(layout.num_tasks, layout.num_experts)
        for task, experts in enumerate(layout.task_experts):
            chosen = list(experts) + layout.shared_experts
            rows[task, chosen] = 1.0 / len(chosen)
        self.register_buffer("route_weights", rows, persistent=False)

    def mixture_rows(self, step: int) -> torch.Tensor:
        return self.route_weights


class FixedRouter(TaskLevelRouter):
    """Routes given in the config (uniform over the listed experts), held as a ``[tasks, experts]`` buffer.

    The buffer is saved with the model, so an exported single-task model carries its frozen mixture here.
    """

    route_weights: torch.Tensor

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int, task_names: list[str] | None = None):
        super().__init__(config, layout, width)
        rows = torch.zeros(layout.num_tasks, layout.num_experts)
        names = task_names or []
        for task in range(layout.num_tasks):
            experts = config.routes.get(names[task]) if task < len(names) else None
            experts = experts if experts is not None else list(layout.task_experts[task])
            for expert in experts:
                if expert >= layout.num_experts:
                    raise UsageError(
                        f"fixed route of task {task} names expert {expert}; the bank has {layout.num_experts}"
                    )
            rows[task, experts] = 1.0 / len(experts)
        self.register_buffer("route_weights", rows)

    def mixture_rows(self, step: int) -> torch.Tensor:
        return self.route_weights


class UniformRouter(TaskLevelRouter):
    """Every task averages every expert (the task-level MoE's 'average routing' baseline)."""

    def mixture_rows(self, step: int) -> torch.Tensor:
        e = self.layout.num_experts
        return torch.full((self.layout.num_tasks, e), 1.0 / e)


class RandomRouter(TaskLevelRouter):
    """Random task-level routes drawn once from a seed: ``random_k`` experts per task, uniform weights."""

    route_weights: torch.Tensor

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int):
        super().__init__(config, layout, width)
        generator = torch.Generator().manual_seed(config.seed)
        k = min(config.random_k, layout.num_experts)
        rows = torch.zeros(layout.num_tasks, layout.num_experts)
        for task in range(layout.num_tasks):
            rows[task, torch.randperm(layout.num_experts, generator=generator)[:k]] = 1.0 / k
        self.register_buffer("route_weights", rows)

    def mixture_rows(self, step: int) -> torch.Tensor:
        return self.route_weights


def prior_logits(config: RouterConfig, layout: ExpertLayout, num_experts: int) -> torch.Tensor:
    """Logits biased toward each task's assigned experts (official ALTER: 0.22 vs 0.20 at tau = 0.1)."""
    logits = torch.full((layout.num_tasks, num_experts), config.prior_other)
    shared = [e for e in layout.shared_experts if e < num_experts]  # stage 1's hard routes used them too
    for task, experts in enumerate(layout.task_experts):
        logits[task, [e for e in experts if e < num_experts] + shared] = config.prior_assigned
    return logits


class TaskWeightsRouter(TaskLevelRouter):
    """Learned per-task logits over all experts of the layer (ALTER's "task weights selector").

    softmax(logits / tau), or Gumbel-softmax / straight-through hard Gumbel, optionally top-k; tau follows
    the configured schedule. Gumbel noise is drawn per example, so the router is not a fixed row in training.
    """

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int):
        super().__init__(config, layout, width)
        self.task_logits = nn.Parameter(prior_logits(config, layout, layout.num_experts))

    def expert_axes(self) -> dict[str, int]:
        return {"task_logits": 1}

    def mixture_rows(self, step: int) -> torch.Tensor:
        weights = _relaxed(self.task_logits, self.config, temperature_at(self.config, step), training=False)
        return _scatter_top_k(weights, self.config.top_k)

    def forward(
        self, hidden: torch.Tensor, task_ids: torch.Tensor, features: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.task_logits[task_ids].to(hidden.dtype)
        weights = _relaxed(logits, self.config, temperature_at(self.config, step), self.training)
        if self.config.mode == "st_gumbel":
            return _sparse_straight_through(weights)
        return _top_k(weights, self.config.top_k)


def _sparse_straight_through(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-hot expert of a straight-through Gumbel sample, keeping its gradient path (weight 1 forward)."""
    ids = weights.argmax(-1, keepdim=True)
    return ids, weights.gather(-1, ids)


def _scatter_top_k(weights: torch.Tensor, k: int | None) -> torch.Tensor:
    ids, kept = _top_k(weights, k)
    return torch.zeros_like(weights).scatter(-1, ids, kept)


class GateRouter(Router):
    """An input-dependent gate over [the task's expert mixture, each shared expert] (ALTER stage 2).

    The gate network (Linear -> ReLU -> Linear -> softmax) reads features pooled over the example's prompt
    tokens only, so a teacher-forced forward and ``generate`` route identically. The task mixture is the
    task-weights selector (``task_logits``, carried over from a task_weights stage when there was one).
    """

    needs_features = True

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int):
        super().__init__(config, layout, width)
        if layout.num_shared_experts < 1:
            raise UsageError(
                "router kind 'gate' mixes the task mixture with shared experts: add at least one shared expert"
            )
        self.task_logits = nn.Parameter(prior_logits(config, layout, layout.num_task_experts))
        hidden_layer = nn.Linear(width, config.gate_hidden)
        output_layer = nn.Linear(config.gate_hidden, 1 + layout.num_shared_experts)
        nn.init.zeros_(output_layer.weight)  # starts as a uniform gate
        nn.init.zeros_(output_layer.bias)
        self.gate = nn.Sequential(hidden_layer, nn.ReLU(), output_layer)

    def forward(
        self, hidden: torch.Tensor, task_ids: torch.Tensor, features: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if features is None:
            raise RuntimeError("the gate router needs pooled prompt features")
        tau = temperature_at(self.config, step)
        task_mix = _scatter_top_k(
            F.softmax(self.task_logits[task_ids].to(hidden.dtype) / tau, dim=-1), self.config.top_k
        )
        gate = F.softmax(self.gate(features.to(self.task_logits.dtype)).to(hidden.dtype), dim=-1)
        weights = torch.cat([gate[:, :1] * task_mix, gate[:, 1:]], dim=-1)
        return _dense_routes(weights)

    def exported_state(self, task: int, kept: list[int]) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state["task_logits"] = state["task_logits"][task : task + 1].clone()
        return state


class TokenRouter(Router):
    """A linear gate on each token's hidden state, optionally conditioned on a learned task embedding."""

    example_level = False

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int):
        super().__init__(config, layout, width)
        extra = config.task_embedding_dim
        self.task_embedding = nn.Embedding(layout.num_tasks, extra) if extra else None
        self.gate = nn.Linear(width + extra, layout.num_experts)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def expert_axes(self) -> dict[str, int]:
        return {"gate.weight": 0, "gate.bias": 0}

    def forward(
        self, hidden: torch.Tensor, task_ids: torch.Tensor, features: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = hidden.to(self.gate.weight.dtype)
        if self.task_embedding is not None:
            embedded = self.task_embedding(task_ids)[:, None, :].expand(-1, hidden.shape[1], -1)
            inputs = torch.cat([inputs, embedded.to(inputs.dtype)], dim=-1)
        weights = _relaxed(self.gate(inputs), self.config, temperature_at(self.config, step), self.training)
        weights = weights.to(hidden.dtype)
        if self.config.mode == "st_gumbel":
            return _sparse_straight_through(weights)
        return _top_k(weights, self.config.top_k)

    def exported_state(self, task: int, kept: list[int]) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if "task_embedding.weight" in state:
            state["task_embedding.weight"] = state["task_embedding.weight"][task : task + 1].clone()
        return state


class TaskEmbeddingRouter(TaskLevelRouter):
    """The task-level MoE router: the model's task-embedding table (one vector per task, shared by every
    layer) through this layer's MLP (embedding -> gate_hidden -> GELU -> experts), then softmax, Gumbel-softmax
    or straight-through hard Gumbel at the scheduled temperature. Gumbel noise is drawn per example.

    The table belongs to the model, not to any one router (``source.task_table()`` returns it), so what one
    layer learns about a task moves its vector for every layer, and a new task is one new row.
    """

    source: TaskTableSource

    def __init__(self, config: RouterConfig, layout: ExpertLayout, width: int, source: TaskTableSource | None):
        super().__init__(config, layout, width)
        if source is None:
            raise UsageError(
                "router kind 'task_embedding' reads the model's task-embedding table: build it in MTAModel"
            )
        object.__setattr__(self, "source", source)  # shared with the model, not a submodule of this router
        self.embedding_dim = dim = config.task_embedding_dim or width
        self.mlp = nn.Sequential(
            nn.Linear(dim, config.gate_hidden), nn.GELU(), nn.Linear(config.gate_hidden, layout.num_experts)
        )

    def expert_axes(self) -> dict[str, int]:
        return {"mlp.2.weight": 0, "mlp.2.bias": 0}

    def task_logits(self) -> torch.Tensor:
        """``[tasks, experts]`` logits of every task (the table is small: computing all rows is cheap)."""
        table = self.source.task_table()
        if table.shape != (self.layout.num_tasks, self.embedding_dim):
            raise RuntimeError(
                f"task-embedding table is {tuple(table.shape)}; this router expects "
                f"({self.layout.num_tasks}, {self.embedding_dim})"
            )
        return self.mlp(table.to(next(self.mlp.parameters()).dtype))

    def mixture_rows(self, step: int) -> torch.Tensor:
        weights = _relaxed(self.task_logits(), self.config, temperature_at(self.config, step), training=False)
        return _scatter_top_k(weights, self.config.top_k)

    def forward(
        self, hidden: torch.Tensor, task_ids: torch.Tensor, features: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.task_logits()[task_ids].to(hidden.dtype)
        weights = _relaxed(logits, self.config, temperature_at(self.config, step), self.training)
        if self.config.mode == "st_gumbel":
            return _sparse_straight_through(weights)
        return _top_k(weights, self.config.top_k)


ROUTERS: dict[str, type[Router]] = {
    "hard": HardRouter,
    "task_weights": TaskWeightsRouter,
    "gate": GateRouter,
    "token": TokenRouter,
    "uniform": UniformRouter,
    "fixed": FixedRouter,
    "random": RandomRouter,
    "task_embedding": TaskEmbeddingRouter,
}


def build_router(
    config: RouterConfig,
    layout: ExpertLayout,
    width: int,
    task_names: list[str],
    tables: TaskTableSource | None = None,
) -> Router:
    """The router of ``config.kind`` over ``layout``; a clear error when the layout cannot support it.

    ``tables`` gives the model's task-embedding table, which the task_embedding kind reads."""
    if config.kind == "task_embedding":
        return TaskEmbeddingRouter(config, layout, width, tables)
    if config.kind == "fixed":
        for name in config.routes:
            if name not in task_names:
                raise UsageError(f"fixed route for unknown task {name!r}; tasks are {task_names}")
        return FixedRouter(config, layout, width, task_names)
    return ROUTERS[config.kind](config, layout, width)


def frozen_config(config: RouterConfig, step: int) -> RouterConfig:
    """The config with the temperature schedule frozen at ``step`` (what an exported model routes with)."""
    return replace(config, temperature=temperature_at(config, step), temperature_decay=0.0, min_temperature=0.0)
