"""inject_mta: place MTA blocks into a stock transformers model without touching its source.

Layers are found by the module patterns the common architectures share: a ``ModuleList`` of identical
blocks (T5 ``encoder.block``, BART ``model.encoder.layers``, GPT-2 ``transformer.h``, Llama ``model.layers``),
a feed-forward sub-layer inside each (``DenseReluDense``, ``mlp``, inline ``fc1``/``fc2``...) and a
self-attention output projection. Placements:

- ``after_ffn`` / ``after_attention``: the sub-layer's output projection is wrapped (PEFT style) so its
  output ``o`` becomes ``o + MTA(o)``; the original module stays inside as ``base_layer``.
- ``replace_ffn``: the feed-forward sub-layer is replaced by the MTA block whose experts are copies of it.
- ``replace_layer``: the whole layer is replaced by a block of routed copies of it (``layer_experts.py``).
- ``projections``: each projection named in ``lora_targets`` gets a routed LoRA update beside it (``lora.py``).

Hooks on each stack capture its attention mask (and, for encoder-decoder models, the pooled encoder output)
into the routing context, for gates that pool over prompt tokens.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alter_ds.config import MTAConfig, RouterConfig
from alter_ds.errors import AlterDsError
from alter_ds.mta.block import MTABlock, RoutingContext, pool_prompt
from alter_ds.mta.experts import ExpertBank, FeedForwardWeights
from alter_ds.mta.routers import ExpertLayout
from alter_ds.ops.grouped_adapter import apply_activation

STACK_LIST_NAMES = ("block", "blocks", "layers", "layer", "h")
FFN_MODULE_NAMES = ("DenseReluDense", "mlp", "feed_forward", "ffn", "mlp_block")
GATED_FFN_NAMES = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"), ("w1", "w3", "w2"))
#: one projection computing [gate | up] (Phi-3), gate first: the op's gated layout already
FUSED_GATED_FFN_NAMES = (("gate_up_proj", "down_proj"),)
PLAIN_FFN_NAMES = (
    ("wi", "wo"),
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("fc_in", "fc_out"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("up_proj", "down_proj"),
)
SELF_ATTENTION_NAMES = ("self_attn", "SelfAttention", "attn", "attention", "self_attention")
ATTENTION_OUTPUT_NAMES = ("o_proj", "out_proj", "o", "c_proj", "dense", "out")
ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "activation")


class InjectionError(AlterDsError, ValueError):
    """The model's structure does not follow a pattern inject_mta knows; names what was not found."""


@dataclass
class Stack:
    name: str  # "encoder" | "decoder"
    path: str
    module: nn.Module  # the module owning the layer list (hooks go here)
    layers: nn.ModuleList


class MTAWrapped(nn.Module):
    """An output projection followed by an MTA block: ``o = base(x); return mta(o)`` (residual inside)."""

    def __init__(self, base_layer: nn.Module, mta: MTABlock):
        super().__init__()
        self.base_layer = base_layer
        self.mta = mta

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.mta(self.base_layer(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # stock code reads attributes of the module it expects (T5 reads ``wo.weight.dtype``)
            return getattr(super().__getattr__("base_layer"), name)


# ----------------------------------------------------------------------------------------- discovery
def find_stacks(model: nn.Module) -> list[Stack]:
    """The layer lists of ``model``: outermost ModuleLists of identical blocks under the usual names."""
    found: list[Stack] = []
    owners = dict(model.named_modules())
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if path.rsplit(".", 1)[-1] not in STACK_LIST_NAMES:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        if any(path.startswith(stack.path + ".") for stack in found):
            continue
        parts = path.split(".")
        name = "encoder" if "encoder" in parts else "decoder"
        owner = owners[".".join(parts[:-1])] if len(parts) > 1 else model
        found.append(Stack(name, path, owner, module))
    if not found:
        raise InjectionError(
            f"no transformer layer list found in {type(model).__name__}: expected an nn.ModuleList named one of "
            f"{STACK_LIST_NAMES} (e.g. model.layers, transformer.h, encoder.block)"
        )
    names = [s.name for s in found]
    if len(set(names)) != len(names):
        raise InjectionError(f"ambiguous layer lists in {type(model).__name__}: {[s.path for s in found]}")
    return found


def _child(module: nn.Module, name: str) -> nn.Module | None:
    child = module._modules.get(name)
    return child if isinstance(child, nn.Module) else None


def find_ffn(layer: nn.Module) -> tuple[nn.Module, str, str]:
    """The module holding the feed-forward projections and the names of its input/output projections.

    Returns ``(owner, in_name, out_name)``; for gated FFNs ``in_name`` is ``"gate_name,up_name"``, for a fused
    gated projection (``FUSED_GATED_FFN_NAMES``) its one name.
    """
    candidates: list[nn.Module] = [layer]
    for path, module in layer.named_modules():
        if path and path.rsplit(".", 1)[-1] in FFN_MODULE_NAMES:
            candidates.insert(0, module)
    for owner in candidates:
        for gate, up, down in GATED_FFN_NAMES:
            if all(_child(owner, n) is not None for n in (gate, up, down)):
                return owner, f"{gate},{up}", down
        for fused, down in FUSED_GATED_FFN_NAMES:
            if _child(owner, fused) is not None and _child(owner, down) is not None:
                return owner, fused, down
        for inner, outer in PLAIN_FFN_NAMES:
            if _child(owner, inner) is not None and _child(owner, outer) is not None:
                return owner, inner, outer
    found = {type(owner).__name__: sorted(name for name, _ in owner.named_children()) for owner in candidates}
    raise InjectionError(
        f"no feed-forward sub-layer found in {type(layer).__name__} (children found: {found}): expected a child "
        f"named one of {FFN_MODULE_NAMES} (or the layer itself) holding projections such as "
        f"{list(PLAIN_FFN_NAMES)}, gated {list(GATED_FFN_NAMES)} or fused gated {list(FUSED_GATED_FFN_NAMES)}"
    )


def find_attention_output(layer: nn.Module) -> tuple[nn.Module, str]:
    """The self-attention module of ``layer`` and the name of its output projection (cross-attention excluded)."""
    for path, module in layer.named_modules():
        if path and path.rsplit(".", 1)[-1] in SELF_ATTENTION_NAMES:
            for name in ATTENTION_OUTPUT_NAMES:
                if _child(module, name) is not None:
                    return module, name
    raise InjectionError(
        f"no self-attention output projection found in {type(layer).__name__}: expected a child named one of "
        f"{SELF_ATTENTION_NAMES} with a projection named one of {ATTENTION_OUTPUT_NAMES}"
    )


def in_out_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as ``[in, out]`` (nn.Linear stores ``[out, in]``; GPT-2's Conv1D ``[in, out]``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InjectionError(f"projection {type(module).__name__} has no weight tensor")
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Linear):
        return weight.detach().t(), bias.detach() if bias is not None else None
    if type(module).__name__ == "Conv1D":
        return weight.detach(), bias.detach() if bias is not None else None
    raise InjectionError(f"unsupported projection type {type(module).__name__} (expected nn.Linear or Conv1D)")


def identify_activation(module: nn.Module | Callable[[torch.Tensor], torch.Tensor], gated: bool) -> str:
    """Name the op activation that computes what ``module`` computes, by evaluating both on a probe grid."""
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64)
    expected = module(probe)
    for name in ("relu", "gelu", "gelu_tanh", "silu", "identity"):
        if torch.allclose(apply_activation(probe, name), expected, atol=1e-6):
            if not gated:
                return name
            return {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}.get(name, name)
    raise InjectionError(f"activation {module!r} matches none of relu, gelu, gelu_tanh, silu, identity")


def _activation_module(owner: nn.Module, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    for holder in (owner, layer):
        for attr in ACTIVATION_ATTRS:
            value = getattr(holder, attr, None)
            if callable(value) and not isinstance(value, (nn.Linear, nn.ModuleList)):
                return value  # type: ignore[no-any-return]
    raise InjectionError(f"no activation found on {type(owner).__name__} (looked for {ACTIVATION_ATTRS})")


def read_feed_forward(layer: nn.Module) -> tuple[nn.Module, str, str, FeedForwardWeights]:
    """The pretrained FFN of ``layer`` in the op's layout, with where it lives."""
    owner, in_name, out_name = find_ffn(layer)
    activation_fn = _activation_module(owner, layer)
    w_out, b_out = in_out_weight(getattr(owner, out_name))
    if "," in in_name:
        gate_name, up_name = in_name.split(",")
        w_gate, b_gate = in_out_weight(getattr(owner, gate_name))
        w_up, b_up = in_out_weight(getattr(owner, up_name))
        w_in = torch.cat([w_gate, w_up], dim=1)
        b_in = torch.cat([b_gate, b_up]) if b_gate is not None and b_up is not None else None
        activation = identify_activation(activation_fn, gated=True)
    else:
        w_in, b_in = in_out_weight(getattr(owner, in_name))
        fused = any(in_name == names[0] for names in FUSED_GATED_FFN_NAMES)
        activation = identify_activation(activation_fn, gated=fused)
    return owner, in_name, out_name, FeedForwardWeights(w_in, b_in, w_out, b_out, activation)


def hidden_width(model: nn.Module) -> int:
    """The width of the model's hidden states (what its layers, and so its MTA blocks, read and write)."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(typing.cast(Any, model).get_input_embeddings().embedding_dim)


# ----------------------------------------------------------------------------------------- injection
def select_layers(spec: str | list[int], num_layers: int, stack: str) -> list[int]:
    if spec == "all":
        return list(range(num_layers))
    if spec == "middle":
        return [num_layers // 2]
    if spec == "none":
        return []
    if isinstance(spec, str):
        raise InjectionError(f"mta layers for the {stack}: unknown value {spec!r} (all, middle, none or a list)")
    for index in spec:
        if not 0 <= index < num_layers:
            raise InjectionError(
                f"mta layers for the {stack}: layer {index} out of range, the {stack} has {num_layers}"
            )
    return sorted(set(spec))


@dataclass
class InjectionResult:
    blocks: dict[str, MTABlock]
    stacks: list[Stack]
    hooks: list[Any]


def inject_mta(
    model: nn.Module,
    config: MTAConfig,
    router: RouterConfig,
    layout: ExpertLayout,
    task_names: list[str],
    context: RoutingContext,
) -> InjectionResult:
    """Insert MTA blocks into ``model`` in place; returns the blocks keyed by a stable name."""
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    stacks = find_stacks(model)
    position = config.resolved_position()
    blocks: dict[str, MTABlock] = {}
    parameter = next(model.parameters())
    for stack in stacks:
        override = config.encoder_layers if stack.name == "encoder" else config.decoder_layers
        chosen = select_layers(override if override is not None else config.layers, len(stack.layers), stack.name)
        for index in chosen:
            layer = stack.layers[index]
            name = f"{stack.name}.{index}"
            if position == "replace_layer":
                from alter_ds.mta.layer_experts import LayerBank, LayerExpertBlock

                bank = LayerBank(
                    layer, layout.num_task_experts, hidden_width(model), index, len(stack.layers), config.layer_noise
                )
                block: MTABlock = LayerExpertBlock(
                    name, stack.name, bank, None, router, layout, task_names, context,
                    residual=False, dropout=0.0, scaling=1.0, is_encoder_decoder=is_encoder_decoder,
                )  # fmt: skip
                stack.layers[index] = block
            elif position == "projections":
                for target, block in _inject_lora(layer, name, stack.name, config, router, layout, task_names,
                                                  context, parameter, is_encoder_decoder):  # fmt: skip
                    blocks[f"{name}.{target}"] = block
                continue
            elif position == "replace_ffn":
                owner, in_name, out_name, ffn = read_feed_forward(layer)
                rank = ffn.w_out.shape[0]
                banks = _make_banks(config, layout, ffn.w_in.shape[0], rank, ffn.activation, parameter, ffn)
                block = _make_block(
                    name, stack.name, banks, config, router, layout, task_names, context, False, is_encoder_decoder
                )
                _replace_ffn(layer, owner, in_name, out_name, block)
            else:
                if position == "after_ffn":
                    owner, _, out_name = find_ffn(layer)
                else:
                    owner, out_name = find_attention_output(layer)
                projection = getattr(owner, out_name)
                width = in_out_weight(projection)[0].shape[1]
                banks = _make_banks(config, layout, width, config.bottleneck_dim, config.activation, parameter, None)
                block = _make_block(
                    name, stack.name, banks, config, router, layout, task_names, context, True, is_encoder_decoder
                )
                setattr(owner, out_name, MTAWrapped(projection, block))
            blocks[name] = block
    if not blocks and not config.injects_nothing():
        raise InjectionError(
            "the mta layer selection chose no layer in any stack (say layers: none for a model without MTA)"
        )
    hooks = _install_context_hooks(stacks, context, is_encoder_decoder)
    return InjectionResult(blocks, stacks, hooks)


def _inject_lora(
    layer: nn.Module,
    name: str,
    stack: str,
    config: MTAConfig,
    router: RouterConfig,
    layout: ExpertLayout,
    task_names: list[str],
    context: RoutingContext,
    like: torch.Tensor,
    is_encoder_decoder: bool,
) -> list[tuple[str, MTABlock]]:
    """A LoRA block beside each targeted projection of ``layer``, named by its target (``.q``, ``.c_attn``;
    an exact name that matches several projections of the layer numbers them)."""
    from alter_ds.mta.lora import LoRABlock, LoRAWrapped, find_lora_targets, projection_widths

    found = find_lora_targets(layer, config.lora_targets)
    counts = {target: sum(t == target for t, _, _ in found) for target, _, _ in found}
    seen: dict[str, int] = {}
    blocks: list[tuple[str, MTABlock]] = []
    for target, owner, child in found:
        projection = getattr(owner, child)
        width, out_width = projection_widths(projection)
        banks = _make_banks(config, layout, width, config.bottleneck_dim, "identity", like, None, False, out_width)
        index = seen[target] = seen.get(target, -1) + 1
        key = target if counts[target] == 1 else f"{target}{index}"
        block = LoRABlock(
            f"{name}.{key}", stack, banks[0], banks[1], router, layout, task_names, context,
            residual=False, dropout=config.dropout, scaling=config.scaling * config.lora_alpha / config.bottleneck_dim,
            is_encoder_decoder=is_encoder_decoder,
        )  # fmt: skip
        setattr(owner, child, LoRAWrapped(projection, block))
        blocks.append((key, block))
    return blocks


def _make_banks(
    config: MTAConfig,
    layout: ExpertLayout,
    width: int,
    rank: int,
    activation: str,
    like: torch.Tensor,
    ffn: FeedForwardWeights | None,
    biases: bool = True,
    out_width: int | None = None,
) -> tuple[ExpertBank, ExpertBank | None]:
    bias = (
        biases and (ffn is None or ffn.b_in is not None),
        biases and (ffn is None or ffn.b_out is not None),
    )
    task_bank = ExpertBank(
        layout.num_task_experts, width, rank, activation, bias[0], bias[1], like.dtype, like.device, out_width
    )
    shared_bank = None
    if layout.num_shared_experts:
        shared_bank = ExpertBank(
            layout.num_shared_experts, width, rank, activation, bias[0], bias[1], like.dtype, like.device, out_width
        )
    init_banks(task_bank, shared_bank, ffn, config.shared_init)
    if ffn is not None:
        task_bank.remember_pretrained(ffn)
    return task_bank, shared_bank


def init_banks(
    task_bank: ExpertBank, shared_bank: ExpertBank | None, ffn: FeedForwardWeights | None, shared_init: str
) -> None:
    """Where experts start: FFN copies from the pretrained FFN (shared ones with a zero output unless
    ``shared_init: pretrained``, the down projection still copied so gradients flow); adapters at zero output."""
    if ffn is None:
        task_bank.init_bottleneck()
        if shared_bank is not None:
            shared_bank.init_bottleneck()
        return
    task_bank.init_from_feed_forward(ffn)
    if shared_bank is not None:
        shared_bank.init_from_feed_forward(ffn)
        if shared_init != "pretrained":
            with torch.no_grad():
                shared_bank.w_up.zero_()
                if shared_bank.b_up is not None:
                    shared_bank.b_up.zero_()


def _make_block(
    name: str,
    stack: str,
    banks: tuple[ExpertBank, ExpertBank | None],
    config: MTAConfig,
    router: RouterConfig,
    layout: ExpertLayout,
    task_names: list[str],
    context: RoutingContext,
    residual: bool,
    is_encoder_decoder: bool,
) -> MTABlock:
    return MTABlock(
        name,
        stack,
        banks[0],
        banks[1],
        router,
        layout,
        task_names,
        context,
        residual=residual,
        dropout=config.dropout,
        scaling=config.scaling,
        is_encoder_decoder=is_encoder_decoder,
    )


class _Identity(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _replace_ffn(layer: nn.Module, owner: nn.Module, in_name: str, out_name: str, block: MTABlock) -> None:
    """Put ``block`` where the FFN was. A separate FFN module is swapped whole; an inline one (BART's
    ``fc1 -> activation_fn -> fc2`` in the layer's own forward) becomes ``mta -> identity -> identity``."""
    if owner is not layer:
        for parent in layer.modules():
            for child_name, child in parent.named_children():
                if child is owner:
                    setattr(parent, child_name, block)
                    return
        raise InjectionError(f"could not locate the feed-forward module inside {type(layer).__name__}")
    first = in_name.split(",")[0]
    setattr(layer, first, block)
    for extra in in_name.split(",")[1:]:
        setattr(layer, extra, _Identity())
    setattr(layer, out_name, _Identity())
    for attr in ACTIVATION_ATTRS:
        if isinstance(getattr(layer, attr, None), nn.Module):
            setattr(layer, attr, _Identity())
        elif callable(getattr(layer, attr, None)):
            setattr(layer, attr, lambda hidden: hidden)


def _install_context_hooks(stacks: list[Stack], context: RoutingContext, is_encoder_decoder: bool) -> list[Any]:
    """Capture each stack's attention mask (and the pooled encoder output) into the routing context."""
    handles = []
    for stack in stacks:

        def capture_mask(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _stack: str = stack.name
        ) -> None:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                context.attention_masks[_stack] = mask

        handles.append(stack.module.register_forward_pre_hook(capture_mask, with_kwargs=True))
        if is_encoder_decoder and stack.name == "encoder":

            def capture_encoder(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
                context.encoder_features = pool_prompt(hidden, context.attention_masks.get("encoder"))

            handles.append(stack.module.register_forward_hook(capture_encoder))
    return handles
