"""The MTA block: router + expert bank(s), reading the routing context of the current forward.

A stock transformers layer calls the block like the sub-layer it wraps (``hidden -> hidden``); the task ids,
prompt mask and pooled prompt features it needs arrive through a ``RoutingContext`` shared by every block of
a model and set by ``MTAModel.forward`` / ``generate``. That is how ``task_ids`` reach every layer without
changing the backbone's code or its ``forward`` signature.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from alter_ds.config import RouterConfig
from alter_ds.mta.experts import ExpertBank, StackedWeights, stacked_weights
from alter_ds.mta.routers import ExpertLayout, Router, build_router
from alter_ds.ops.grouped_adapter import apply_activation, grouped_adapter, selected_implementation


@dataclass
class RoutingContext:
    """What the blocks of one model read during a forward: set per call, never stored in weights."""

    task_ids: torch.Tensor | None = None  # [B]
    prompt_mask: torch.Tensor | None = None  # [B, T], 1 on prompt tokens (decoder-only training)
    attention_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # per stack, captured by hooks
    encoder_features: torch.Tensor | None = None  # [B, d] pooled encoder output (seq2seq decoders' gates)
    generating: bool = False
    prompt_features: dict[str, torch.Tensor] = field(default_factory=dict)  # per block, cached in generate
    step: int = 0
    replaying: bool = False  # an activation-checkpointing recompute: the routing is the forward's, not recorded
    #: every block computes what the backbone computed there before injection (MTAModel.pretrained_only)
    pretrained_only: bool = False
    #: the model's task-embedding table (task_embedding routers read it); owned by MTAModel, kept across calls
    task_embeddings: nn.Embedding | None = None

    def reset(self, task_ids: torch.Tensor | None, prompt_mask: torch.Tensor | None, generating: bool) -> None:
        self.task_ids = task_ids
        self.prompt_mask = prompt_mask
        self.attention_masks = {}
        self.encoder_features = None
        self.generating = generating
        self.prompt_features = {}

    def snapshot(self) -> RoutingContext:
        """The state of one call, to replay it later (dicts copied: later calls must not change it)."""
        return replace(self, attention_masks=dict(self.attention_masks), prompt_features=dict(self.prompt_features))

    @contextlib.contextmanager
    def replay(self, saved: RoutingContext) -> Iterator[None]:
        """Run with a saved call's state (task ids, masks, features), then put back what was there."""
        current = self.snapshot()
        self._load(saved)
        self.replaying = True
        try:
            yield
        finally:
            self._load(current)

    def _load(self, other: RoutingContext) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(other, item.name))

    def checkpointing(self, checkpoint: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap an activation-checkpointing function so that the recompute in backward routes like the forward.

        The routing state is scoped to ``MTAModel.forward`` and cleared when it returns, but checkpointed layers
        run again during backward: the wrapper saves the state when the layer first runs and replays it for
        the recompute, so every example keeps its task's experts and no usage is counted twice.
        """
        if getattr(checkpoint, "routes_mta", False):
            return checkpoint

        @functools.wraps(checkpoint)
        def routed_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            saved = self.snapshot()
            calls = 0

            def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == 1:
                    return function(*inner_args, **inner_kwargs)
                with self.replay(saved):
                    return function(*inner_args, **inner_kwargs)

            return checkpoint(run, *args, **kwargs)

        routed_checkpoint.routes_mta = True  # type: ignore[attr-defined]
        return routed_checkpoint

    def task_table(self) -> torch.Tensor:
        """``[tasks, dim]``: the table every task_embedding router of the model reads."""
        if self.task_embeddings is None:
            raise RuntimeError("this model has no task-embedding table (MTAModel.ensure_task_embeddings makes it)")
        return self.task_embeddings.weight

    def rows(self, tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
        """Expand per-example data to ``batch`` rows: generate repeats each example for beams/samples."""
        if tensor.shape[0] == batch:
            return tensor
        if tensor.shape[0] and batch % tensor.shape[0] == 0:
            return tensor.repeat_interleave(batch // tensor.shape[0], dim=0)
        raise ValueError(f"{what} has {tensor.shape[0]} rows but the layer sees a batch of {batch}")


def _moved_experts(old: ExpertLayout, new: ExpertLayout) -> dict[int, int] | None:
    """Old expert index -> new index when experts were added (task experts stay, shared ones shift past the
    added task experts); None when the stack did not grow that way."""
    if new.num_task_experts < old.num_task_experts or new.num_shared_experts < old.num_shared_experts:
        return None
    moved = {e: e for e in range(old.num_task_experts)}
    shift = new.num_task_experts - old.num_task_experts
    moved.update({e: e + shift for e in range(old.num_task_experts, old.num_experts)})
    return moved


def _per_example_path(inputs: torch.Tensor, b_down: torch.Tensor | None, b_up: torch.Tensor | None) -> bool:
    """Example-level routes take ``per_example_experts`` unless an implementation of the op is forced (tests and
    benchmarks of the op itself) or biases would get their gradient summed in half precision (see
    ``grouped_adapter_reference``)."""
    exact = inputs.dtype in (torch.float32, torch.float64) or (b_down is None and b_up is None)
    return exact and selected_implementation() == "auto"


def per_example_experts(
    inputs: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
    by_expert: bool | None = None,
) -> torch.Tensor:
    """The grouped op for routes chosen per example (``expert_ids [B, k]``). Same result as the op
    (``tests/test_grouped_adapter.py``); the stacked weights get dense gradients (zeros for experts no example
    used), which ZeRO-2 needs.

    Two ways, chosen by the memory each moves (``by_expert=None``; ``_moves_less_by_expert``): small experts
    (adapters, LoRA) are gathered per example and applied to its tokens with batched matmuls, as multi-LoRA
    servers do; large ones (FFN copies) run once per expert over the rows that chose it, since gathering them
    copies a whole FFN per (row, slot) — a label-scoring forward of 256 rows through 9 FFN copies gathered
    ~24 GB.
    """
    if by_expert is None:
        by_expert = _moves_less_by_expert(inputs, expert_ids, w_down, w_up)
    if by_expert:
        return _experts_over_their_rows(inputs, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation)
    dtype = inputs.dtype
    out: torch.Tensor | None = None
    for slot in range(expert_ids.shape[1]):
        chosen = expert_ids[:, slot]
        hidden = torch.bmm(inputs, w_down.index_select(0, chosen).to(dtype))
        if b_down is not None:
            hidden = hidden + b_down.index_select(0, chosen).to(dtype)[:, None, :]
        hidden = torch.bmm(apply_activation(hidden, activation), w_up.index_select(0, chosen).to(dtype))
        if b_up is not None:
            hidden = hidden + b_up.index_select(0, chosen).to(dtype)[:, None, :]
        term = hidden * expert_weights[:, slot, None, None].to(dtype)
        out = term if out is None else out + term
    assert out is not None, "a route has at least one slot"
    return out


def _moves_less_by_expert(
    inputs: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor
) -> bool:
    """Whether running each expert over its rows moves fewer elements than gathering each row's experts.

    Gathering copies one expert's weights per (row, slot); by expert reads each expert's weights once but
    copies each (row, slot)'s activations in and out.
    """
    rows, slots = expert_ids.shape
    per_expert = w_down[0].numel() + w_up[0].numel()
    activations = inputs.shape[1] * (w_down.shape[1] + w_up.shape[2])
    return w_down.shape[0] * per_expert + rows * slots * activations < rows * slots * per_expert


def _experts_over_their_rows(
    inputs: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """``per_example_experts`` one expert at a time: its weight per row summed over the slots that chose it."""
    dtype = inputs.dtype
    weights = expert_weights.to(dtype)
    out = inputs.new_zeros(*inputs.shape[:2], w_up.shape[2])
    # one view per expert: unbind's backward stacks the experts' gradients once (zeros for the unchosen), where
    # indexing the stack would allocate a whole stack-sized gradient per expert
    downs, ups = w_down.unbind(0), w_up.unbind(0)
    b_downs = b_down.unbind(0) if b_down is not None else None
    b_ups = b_up.unbind(0) if b_up is not None else None
    for expert in torch.unique(expert_ids).tolist():
        chosen = expert_ids == expert  # [B, k]
        rows = chosen.any(1).nonzero().squeeze(1)
        weight = (weights * chosen).sum(1).index_select(0, rows)
        hidden = inputs.index_select(0, rows) @ downs[expert].to(dtype)
        if b_downs is not None:
            hidden = hidden + b_downs[expert].to(dtype)
        hidden = apply_activation(hidden, activation) @ ups[expert].to(dtype)
        if b_ups is not None:
            hidden = hidden + b_ups[expert].to(dtype)
        out = out.index_add(0, rows, hidden * weight[:, None, None])
    return out


def pool_prompt(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden [B, T, d]`` over the tokens where ``mask [B, T]`` is set (all when None)."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MTABlock(nn.Module):
    """Mixture of task experts at one place of one layer: ``y = Σ_j w_j · expert_j(x)``.

    ``residual=True`` (bottleneck experts) returns ``x + scaling · dropout(y)``; ``residual=False`` (FFN experts
    replacing the feed-forward sub-layer) returns ``scaling · dropout(y)``.
    """

    context: RoutingContext

    def __init__(
        self,
        name: str,
        stack: str,
        task_experts: ExpertBank,
        shared_experts: ExpertBank | None,
        router_config: RouterConfig,
        layout: ExpertLayout,
        task_names: list[str],
        context: RoutingContext,
        residual: bool,
        dropout: float,
        scaling: float,
        is_encoder_decoder: bool,
    ):
        super().__init__()
        self.name = name
        self.stack = stack
        self.task_experts = task_experts
        self.shared_experts = shared_experts
        self.layout = layout
        self.task_names = task_names
        object.__setattr__(self, "context", context)  # shared plain object, not a submodule
        self.router: Router = build_router(router_config, layout, task_experts.width, task_names, context)
        self.residual = residual
        self.dropout = nn.Dropout(dropout)
        self.scaling = scaling
        self.is_encoder_decoder = is_encoder_decoder
        # fp32 accumulators kept outside the module's buffers: a bf16 cast of the model must not round counts
        self.usage_sum: torch.Tensor | None = None
        self.usage_count: torch.Tensor | None = None
        self.record_usage = True
        self._stack: tuple[tuple[object, ...], StackedWeights] | None = None  # see expert_weights

    # ------------------------------------------------------------------------------------- forward
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.context.pretrained_only:
            return self.pretrained_forward(hidden)
        if hidden.dim() == 2:  # OPT flattens [B, T, d] to [B*T, d] around its FFN: give the tokens their rows back
            rows = self._rows_of_flat(hidden.shape[0])
            out = self.forward(hidden.reshape(rows, -1, hidden.shape[-1]))
            return out.reshape(*hidden.shape[:-1], out.shape[-1])
        return self.adapted(hidden)

    def adapted(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output for ``[B, T, d]`` tokens once routing applies: what each expert kind changes."""
        out = self.dropout(self.mixture(hidden, hidden))
        if self.scaling != 1.0:
            out = out * self.scaling
        return hidden + out if self.residual else out

    def mixture(self, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``Σ_j w_j · expert_j(inputs)`` for ``[B, T, d]`` tensors, routed on ``hidden`` (the block's input:
        ``inputs`` is that input or a dropout of it)."""
        batch, length, width = inputs.shape
        expert_ids, expert_weights = self.route(hidden)
        w_down, b_down, w_up, b_up = self.expert_weights()
        if expert_ids.dim() == 2 and _per_example_path(inputs, b_down, b_up):
            return per_example_experts(
                inputs, expert_ids, expert_weights, w_down, b_down, w_up, b_up, self.task_experts.activation
            )
        if expert_ids.dim() == 2:  # example-level: broadcast over the example's tokens
            expert_ids = expert_ids[:, None, :].expand(batch, length, -1)
            expert_weights = expert_weights[:, None, :].expand(batch, length, -1)
        flat = inputs.reshape(-1, width)
        return grouped_adapter(
            flat,
            expert_ids.reshape(-1, expert_ids.shape[-1]),
            expert_weights.reshape(-1, expert_weights.shape[-1]).to(flat.dtype),
            w_down.to(flat.dtype),
            b_down.to(flat.dtype) if b_down is not None else None,
            w_up.to(flat.dtype),
            b_up.to(flat.dtype) if b_up is not None else None,
            self.task_experts.activation,
        ).reshape(batch, length, -1)

    def pretrained_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the backbone computed here: nothing added (a residual adapter), or the pretrained FFN."""
        if self.residual:
            return hidden
        source = self.task_experts.pretrained()
        if source is None:
            raise RuntimeError(f"MTA block {self.name} replaced a sub-layer it kept no pretrained copy of")
        flat = hidden.reshape(-1, hidden.shape[-1])
        ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)
        out = grouped_adapter(
            flat,
            torch.zeros(flat.shape[0], 1, dtype=torch.long, device=flat.device),
            ones,
            source.w_in[None].to(flat.dtype),
            source.b_in[None].to(flat.dtype) if source.b_in is not None else None,
            source.w_out[None].to(flat.dtype),
            source.b_out[None].to(flat.dtype) if source.b_out is not None else None,
            source.activation,
        )
        return out.reshape(hidden.shape)

    def _rows_of_flat(self, tokens: int) -> int:
        """How many rows ``tokens`` flattened tokens came from: the stack's attention mask has one per row (beams
        and returned sequences included); without one, the task ids (and each token is its own row when
        neither divides, which routing by task still gets right)."""
        mask = self.context.attention_masks.get(self.stack)
        for candidate in (mask, self.context.task_ids):
            if candidate is not None and candidate.shape[0] and tokens % candidate.shape[0] == 0:
                return int(candidate.shape[0])
        return tokens

    def expert_weights(self) -> StackedWeights:
        """Task and shared experts' weights as one stack, the op's input.

        With shared experts that is a concatenation. When no gradient can reach the experts (evaluation, a
        router-only stage) the stack is kept and reused until a weight changes: in-place updates (an optimizer
        step, ``load_state_dict``) bump a tensor's version, and moving or casting the model gives new storage.
        That costs one extra copy of the expert weights while it is kept, instead of a copy per forward.
        """
        banks = [self.task_experts] + ([self.shared_experts] if self.shared_experts is not None else [])
        if len(banks) == 1:
            return stacked_weights(banks)
        tensors = [t for bank in banks for t in bank.weights() if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            self._stack = None
            return stacked_weights(banks)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)
        if self._stack is None or self._stack[0] != key:
            with torch.no_grad():
                self._stack = (key, stacked_weights(banks))
        return self._stack[1]

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.context
        if context.task_ids is None:
            raise RuntimeError(
                f"MTA block {self.name} ran without task ids: call the model with task_ids=... "
                f"(the MTAModel wrapper, not the bare backbone)"
            )
        batch = hidden.shape[0]
        task_ids = context.rows(context.task_ids, batch, "task_ids")
        features = self.prompt_features(hidden) if self.router.needs_features else None
        expert_ids, expert_weights = self.router(hidden, task_ids, features, context.step)
        if self.record_usage and not context.replaying:
            self._record(task_ids, expert_ids, expert_weights)
        return expert_ids, expert_weights

    def prompt_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pooled prompt features, computed on the prompt and reused for every generated token."""
        context = self.context
        batch, length = hidden.shape[:2]
        cached = context.prompt_features.get(self.name)
        if cached is not None:
            return context.rows(cached, batch, "cached prompt features")
        if self.is_encoder_decoder and self.stack == "decoder":
            if context.encoder_features is None:
                raise RuntimeError(f"MTA block {self.name}: no encoder output to pool for the gate")
            features = context.rows(context.encoder_features, batch, "encoder features")
        else:
            mask = None
            candidates = [context.prompt_mask, context.attention_masks.get(self.stack)]
            for candidate in candidates:
                if candidate is not None and candidate.dim() == 2:
                    candidate = context.rows(candidate, batch, "prompt mask")
                    if candidate.shape[1] == length:
                        mask = candidate
                        break
            features = pool_prompt(hidden, mask)
        if context.generating:
            context.prompt_features[self.name] = features
        return features

    @torch.no_grad()
    def _record(self, task_ids: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> None:
        device = expert_ids.device
        dense = torch.zeros(*expert_ids.shape[:-1], self.layout.num_experts, device=device)
        dense.scatter_add_(-1, expert_ids, expert_weights.detach().float())
        if dense.dim() == 3:
            dense = dense.mean(1)
        if (
            self.usage_sum is None
            or self.usage_count is None
            or self.usage_sum.shape != (self.layout.num_tasks, dense.shape[-1])
        ):
            self.usage_sum = torch.zeros(self.layout.num_tasks, dense.shape[-1], device=device)
            self.usage_count = torch.zeros(self.layout.num_tasks, device=device)
        self.usage_sum.index_add_(0, task_ids, dense)
        self.usage_count.index_add_(0, task_ids, torch.ones_like(task_ids, dtype=torch.float32))

    def usage(self, reset: bool = True) -> torch.Tensor:
        """Mean routing weight of each task over each expert since the last reset (``[tasks, experts]``)."""
        if self.usage_sum is None or self.usage_count is None:
            return torch.zeros(self.layout.num_tasks, self.layout.num_experts)
        mean = self.usage_sum / self.usage_count.clamp_min(1).unsqueeze(-1)
        if reset:
            self.usage_sum = self.usage_count = None
        return mean

    # -------------------------------------------------------------------------------- structure
    def set_router(self, config: RouterConfig, layout: ExpertLayout | None = None) -> None:
        """Switch the router (stage change, experts added), carrying over every parameter whose name matches.

        Overlapping slices are copied, so task logits learned in a task_weights stage seed a gate stage and
        keep their values when experts are added (new columns start at the prior). Along a router's expert
        axes each expert's slice goes to that expert's new index: a task expert added before the shared ones
        moves them up by one.
        """
        old, old_layout = self.router, self.layout
        self.layout = layout or self.layout
        new = build_router(config, self.layout, self.task_experts.width, self.task_names, self.context)
        old_state = old.state_dict()
        moved = _moved_experts(old_layout, self.layout)
        axes = new.expert_axes() if type(new) is type(old) else {}
        with torch.no_grad():
            for name, tensor in new.state_dict().items():
                if name not in old_state or old_state[name].dim() != tensor.dim():
                    continue
                source = old_state[name]
                axis = axes.get(name)
                if axis is None or moved is None or source.shape[axis] != old_layout.num_experts:
                    index = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, source.shape))
                    tensor[index].copy_(source[index])
                    continue
                for old_expert, new_expert in moved.items():
                    target, origin = tensor.select(axis, new_expert), source.select(axis, old_expert)
                    index = tuple(slice(0, min(a, b)) for a, b in zip(target.shape, origin.shape))
                    target[index].copy_(origin[index])
        reference = next(self.task_experts.parameters())
        self.router = new.to(device=reference.device)
        self.usage_sum = self.usage_count = None

    def router_config(self) -> RouterConfig:
        return replace(self.router.config)

    def extra_repr(self) -> str:
        return f"name={self.name}, residual={self.residual}, scaling={self.scaling}"
