"""Experiment configuration: dataclasses loaded from YAML and validated once, with errors naming the key.

Every section is a dataclass whose defaults are the single source of truth. ``load_config`` reads a YAML
file, builds the dataclasses field by field from their type hints (so an unknown key, a wrong type or a
value out of range is reported as ``file:line: stages[1].router.kind: ...``) and runs the cross-field
checks (task names used in routes, stage references) before anything else starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from alter_ds.errors import AlterDsError
from alter_ds.ops.grouped_adapter import ACTIVATIONS

KeyPath = tuple[str | int, ...]


class ConfigError(AlterDsError, ValueError):
    """A configuration problem, reported once with the key path and, when known, the file and line."""

    def __init__(self, message: str, key: KeyPath = (), source: str | None = None, line: int | None = None):
        self.key = key
        self.source = source
        self.line = line
        self.detail = message
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        name = format_key(key)
        super().__init__(f"{where}{name + ': ' if name else ''}{message}")


class FieldError(AlterDsError, ValueError):
    """Raised by ``validate`` methods; the loader turns it into a ConfigError with the full key path."""

    def __init__(self, key: str | KeyPath, message: str):
        self.key: KeyPath = (key,) if isinstance(key, str) else tuple(key)
        self.detail = message
        super().__init__(f"{format_key(self.key)}: {message}")


def format_key(key: KeyPath) -> str:
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def require(condition: bool, key: str | KeyPath, message: str) -> None:
    if not condition:
        raise FieldError(key, message)


# ----------------------------------------------------------------------------------------------- sections

RouterKind = Literal["hard", "task_weights", "gate", "token", "uniform", "fixed", "random", "task_embedding"]
RouterMode = Literal["softmax", "gumbel", "st_gumbel"]
ExpertInit = Literal["zeros", "pretrained", "expert"]
PARAMETER_GROUPS = ("backbone", "task_experts", "shared_experts", "router", "task_embeddings")
EmbeddingInit = Literal["random", "inputs"]
#: a name that is also a directory name (run names, study arms)
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ModelConfig:
    """The backbone: any Hugging Face model id or local path (loaded with the real ``from_pretrained``)."""

    name_or_path: str
    kind: Literal["auto", "causal", "seq2seq"] = "auto"
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None

    def validate(self) -> None:
        require(bool(self.name_or_path.strip()), "name_or_path", "must not be empty")


METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l", "chrf")
SPLITS = ("train", "dev", "test")


@dataclass
class TaskConfig:
    """A task: its name (the id is its position in the list), category, where its examples come from and how
    they become a prompt and a target. Only ``name`` and ``category`` matter to the model."""

    name: str
    category: str = "default"
    #: a directory holding {train,dev,test}.{jsonl,csv,tsv}, or a file path containing "{split}"
    source: str | None = None
    #: or a registered builder generating the examples in code (e.g. "synthetic/reverse")
    builder: str | None = None
    format: Literal["auto", "jsonl", "csv", "tsv"] = "auto"
    #: the prompt, a str.format template over the record's fields
    template: str = "{input}"
    target_field: str = "target"
    #: label verbaliser (raw label -> target text) for classification; empty for free-text targets
    labels: dict[str, str] = field(default_factory=dict)
    #: put between prompt and target for decoder-only models
    target_prefix: str = " "
    metric: Literal["accuracy", "macro_f1", "exact_match", "rouge_l", "chrf"] = "exact_match"
    max_input_tokens: int = 256
    max_target_tokens: int = 32
    #: which end of a too-long prompt is cut: "left" keeps the end (where the question usually is)
    truncation: Literal["left", "right"] = "left"
    #: at most this many examples per split (first ones of the file), e.g. {train: 1000}
    max_examples: dict[str, int] = field(default_factory=dict)
    on_error: Literal["fail", "skip"] = "fail"

    def validate(self) -> None:
        import string

        require(bool(self.name.strip()), "name", "must not be empty")
        require(not (self.source and self.builder), "builder", "give either source or builder, not both")
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        except ValueError as error:
            raise FieldError("template", f"not a valid format string: {error}") from None
        require(all(fields), "template", "use named fields like {text}, not positional {}")
        require(self.max_input_tokens >= 1, "max_input_tokens", "must be >= 1")
        require(self.max_target_tokens >= 1, "max_target_tokens", "must be >= 1")
        for split, count in self.max_examples.items():
            require(split in SPLITS, ("max_examples", split), f"unknown split; one of {SPLITS}")
            require(count >= 1, ("max_examples", split), "must be >= 1")
        if self.metric in ("accuracy", "macro_f1"):
            require(bool(self.labels), "labels", f"metric {self.metric} scores labels: give the label verbaliser")

    def template_fields(self) -> list[str]:
        import string

        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]


@dataclass
class DataConfig:
    """How examples of all tasks become training batches."""

    #: relative task sources resolve against this directory
    root: str = "."
    #: proportional to task size, temperature (p ~ n^(1/T)) or uniform over tasks
    sampling: Literal["proportional", "temperature", "uniform"] = "proportional"
    temperature: float = 2.0
    #: cap on a task's examples (its size for sampling and the pool it draws from)
    max_examples_per_task: int | None = None
    #: mixed-task batches (default) or every global batch from one task
    mixed_batches: bool = True
    #: pack several examples of one task into each sequence (decoder-only)
    packing: bool = False
    max_length: int = 512

    def validate(self) -> None:
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.max_examples_per_task is None or self.max_examples_per_task >= 1, "max_examples_per_task", ">= 1")
        require(self.max_length >= 2, "max_length", "must be >= 2")


@dataclass
class MTAConfig:
    """Where the Mixture-of-Task-Adapters goes and what its expert banks hold."""

    #: bottleneck adapters, copies of the pretrained FFN (ALTER), copies of the whole layer (task-level MoE), or
    #: LoRA updates of chosen linear projections (exportable as a PEFT LoRA adapter)
    expert_kind: Literal["bottleneck", "ffn", "layer", "lora"] = "bottleneck"
    #: after_ffn / after_attention: a residual bottleneck on that sub-layer's output; replace_ffn: experts
    #: take the place of the feed-forward sub-layer (required by, and the default for, ``ffn`` experts);
    #: replace_layer: copies of the layer take its place (required by, and the default for, ``layer`` experts);
    #: projections: beside each projection named in ``lora_targets`` (required by, and the default for, ``lora``).
    position: Literal["after_ffn", "after_attention", "replace_ffn", "replace_layer", "projections"] | None = None
    #: "all", "middle" (one layer, index L // 2), explicit layer indices, or "none"; per stack below when
    #: given. "none" everywhere is the plain backbone without MTA (the full fine-tuning baseline).
    layers: str | list[int] = "all"
    encoder_layers: str | list[int] | None = None
    decoder_layers: str | list[int] | None = None
    #: the adapters' inner width: the bottleneck of ``bottleneck`` experts, the rank r of ``lora`` experts
    bottleneck_dim: int = 16
    activation: str = "relu"
    #: lora experts: the projections of each chosen layer that get them, as aliases (q, k, v, o: the
    #: self-attention's; gate, up, down: the FFN's) or exact module names (``c_attn``, ``query_key_value``)
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    #: lora experts: the update is scaled by lora_alpha / r, as in PEFT
    lora_alpha: float = 16.0
    #: Task experts in each bank; None means one per task.
    num_task_experts: int | None = None
    #: The prior map: which task experts each task is assigned (default: task i -> expert i).
    task_experts: dict[str, list[int]] = field(default_factory=dict)
    num_shared_experts: int = 0
    #: zeros: output starts at zero (up projection zero); pretrained: a copy of the FFN (ffn experts only).
    shared_init: Literal["zeros", "pretrained"] = "zeros"
    dropout: float = 0.0
    scaling: float = 1.0
    #: layer experts: each copy starts as the pretrained layer plus Gaussian noise of this std
    layer_noise: float = 1e-8

    def resolved_position(self) -> str:
        if self.position is not None:
            return self.position
        return {"ffn": "replace_ffn", "layer": "replace_layer", "lora": "projections"}.get(
            self.expert_kind, "after_ffn"
        )

    def injects_nothing(self) -> bool:
        """No MTA block anywhere, asked for explicitly: the model is the bare backbone."""
        return self.layers == "none" and all(s in (None, "none") for s in (self.encoder_layers, self.decoder_layers))

    def validate(self) -> None:
        for key in ("layers", "encoder_layers", "decoder_layers"):
            value = getattr(self, key)
            if isinstance(value, str):
                require(value in ("all", "middle", "none"), key, f"must be all, middle, none or a list, got {value!r}")
            elif isinstance(value, list):
                require(all(i >= 0 for i in value), key, "layer indices must be >= 0")
        require(self.bottleneck_dim >= 1, "bottleneck_dim", f"must be >= 1, got {self.bottleneck_dim}")
        require(
            self.activation in ACTIVATIONS, "activation", f"unknown {self.activation!r}; one of {list(ACTIVATIONS)}"
        )
        require(self.num_task_experts is None or self.num_task_experts >= 1, "num_task_experts", "must be >= 1")
        require(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        require(self.layer_noise >= 0, "layer_noise", "must be >= 0")
        if self.expert_kind == "layer":
            require(self.resolved_position() == "replace_layer", "position", "layer experts replace the layer")
            require(
                self.num_task_experts is not None,
                "num_task_experts",
                "layer experts need the number of copies per layer (the task-level MoE uses 3)",
            )
            require(self.num_shared_experts == 0, "num_shared_experts", "layer experts have no shared experts")
        else:
            require(self.position != "replace_layer", "position", "replace_layer needs expert_kind: layer")
        if self.expert_kind == "lora":
            require(self.resolved_position() == "projections", "position", "lora experts sit beside projections")
            require(bool(self.lora_targets), "lora_targets", "name at least one projection (q, k, v, o, gate, ...)")
            require(
                len(set(self.lora_targets)) == len(self.lora_targets), "lora_targets", "a projection is named twice"
            )
            require(self.lora_alpha > 0 and math.isfinite(self.lora_alpha), "lora_alpha", "must be > 0")
        else:
            require(self.position != "projections", "position", "projections needs expert_kind: lora")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(math.isfinite(self.scaling), "scaling", "must be finite")
        require(
            self.shared_init != "pretrained" or self.expert_kind == "ffn",
            "shared_init",
            "pretrained copies the layer's FFN and needs expert_kind: ffn",
        )
        if self.expert_kind == "ffn":
            require(
                self.resolved_position() == "replace_ffn", "position", "ffn experts replace the FFN: use replace_ffn"
            )
        else:
            require(self.resolved_position() != "replace_ffn", "position", "replace_ffn needs expert_kind: ffn")
        if self.num_task_experts is not None:
            for task, experts in self.task_experts.items():
                for expert in experts:
                    require(
                        0 <= expert < self.num_task_experts,
                        ("task_experts", task),
                        f"expert {expert} out of range [0, {self.num_task_experts})",
                    )
        for task, experts in self.task_experts.items():
            require(len(experts) > 0, ("task_experts", task), "assign at least one expert")


@dataclass
class RouterConfig:
    """How a block mixes its experts. One dataclass for every kind; each kind reads the fields it needs."""

    kind: RouterKind = "hard"
    mode: RouterMode = "softmax"
    #: tau_t = max(temperature * exp(-temperature_decay * step), min_temperature)
    temperature: float = 1.0
    temperature_decay: float = 0.0
    min_temperature: float = 0.0
    top_k: int | None = None
    #: task_weights/gate init: logit of a task's assigned experts vs the others (official ALTER: 0.22 / 0.20).
    prior_assigned: float = 0.22
    prior_other: float = 0.20
    #: hidden width of the gate network (gate) and of each layer's router MLP (task_embedding)
    gate_hidden: int = 64
    #: token router: concatenate a learned task embedding of this size to each token's state (0: none).
    #: task_embedding router: the size of the model's task-embedding table (0: the backbone's width).
    task_embedding_dim: int = 0
    #: task_embedding router, a table this stage creates: random (N(0, 1)) or inputs (each task's mean-pooled
    #: backbone states over its first ``embedding_examples`` training inputs; needs the backbone's width)
    embedding_init: EmbeddingInit = "random"
    embedding_examples: int = 32
    #: fixed router: task name -> experts (uniform weights over them).
    routes: dict[str, list[int]] = field(default_factory=dict)
    #: random router: experts per task drawn once from this seed.
    random_k: int = 1
    seed: int = 0

    def validate(self) -> None:
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.temperature_decay >= 0, "temperature_decay", "must be >= 0")
        require(0 <= self.min_temperature <= self.temperature, "min_temperature", "must be in [0, temperature]")
        require(self.top_k is None or self.top_k >= 1, "top_k", "must be >= 1")
        require(self.gate_hidden >= 1, "gate_hidden", "must be >= 1")
        require(self.task_embedding_dim >= 0, "task_embedding_dim", "must be >= 0")
        require(self.random_k >= 1, "random_k", "must be >= 1")
        require(self.embedding_examples >= 1, "embedding_examples", "must be >= 1")
        if self.kind == "fixed":
            require(bool(self.routes), "routes", "a fixed router needs routes: {task: [experts]}")
        for task, experts in self.routes.items():
            require(len(experts) > 0 and all(e >= 0 for e in experts), ("routes", task), "list expert ids >= 0")


@dataclass
class AddExpertsConfig:
    """Experts a stage adds before it trains (stage 2's shared experts, or a new task's expert)."""

    shared: int = 0
    init: ExpertInit = "zeros"
    #: with init: expert, copy this expert (index in the bank).
    source_expert: int | None = None

    def validate(self) -> None:
        require(self.shared >= 0, "shared", "must be >= 0")
        require(self.init != "expert" or self.source_expert is not None, "source_expert", "init: expert needs it")


@dataclass
class StageConfig:
    """One training stage as data: its router, what trains, what it adds and where it starts."""

    name: str
    router: RouterConfig = field(default_factory=RouterConfig)
    #: parameter groups (backbone, task_experts, shared_experts, router) or fnmatch patterns on names.
    train: list[str] = field(default_factory=lambda: ["task_experts", "shared_experts", "router"])
    add_experts: AddExpertsConfig = field(default_factory=AddExpertsConfig)
    #: start every expert again before training (the task-level MoE's stage 2: layer and FFN copies from the
    #: pretrained weights, adapters at zero output) while the routes carry over
    reset_experts: bool = False
    lr: float = 1e-3
    #: a learning rate of its own for some parameter groups, e.g. {task_experts: 1e-5, router: 1e-3,
    #: task_embeddings: 1e-2} (the task-level MoE recipe); the rest train at ``lr``. The schedule scales each.
    group_lr: dict[str, float] = field(default_factory=dict)
    steps: int = 100
    #: where the stage starts: null (the backbone) or the name of an earlier stage (its exported model).
    init_from: str | None = None

    def validate(self) -> None:
        require(bool(self.name.strip()), "name", "must not be empty")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        for group, rate in self.group_lr.items():
            require(
                group in PARAMETER_GROUPS,
                ("group_lr", group),
                f"is not a parameter group ({', '.join(PARAMETER_GROUPS)})",
            )
            require(rate > 0, ("group_lr", group), f"must be > 0, got {rate}")
        require(self.steps >= 0, "steps", "must be >= 0")
        require(bool(self.train), "train", "name at least one parameter group or pattern")


@dataclass
class TrainingConfig:
    """How stages train: the DeepSpeed config they start from and what the YAML overrides in it."""

    #: base DeepSpeed JSON; "auto" picks ds_configs/zero2_gpu_bf16.json on GPUs, zero2_cpu_fp32.json on CPU
    deepspeed_config: str = "auto"
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    #: auto: bf16 where the accelerator supports it fast (GPU), fp32 on CPU (bf16 is ~20x slower there)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    warmup_steps: int = 10
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    #: recompute the backbone's layers in backward instead of keeping their activations (less memory, ~1/3
    #: more compute); each layer replays the routing of its forward
    activation_checkpointing: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    #: evaluate on dev every N steps (0: at the end of each stage only)
    eval_every: int = 0
    eval_batch_size: int = 16
    #: at most this many dev/test examples per task in evaluation (None: all)
    eval_max_examples: int | None = None
    #: evaluate the backbone before the first stage (the MTA model at init computes exactly the backbone)
    eval_backbone: bool = True
    #: consecutive non-finite losses tolerated (each skipped) before the run checkpoints and stops
    max_nonfinite_steps: int = 5
    output_dir: str = "runs"

    def validate(self) -> None:
        for key in (
            "micro_batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "log_every",
            "eval_batch_size",
            "keep_checkpoints",
            "max_nonfinite_steps",
        ):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.eval_every >= 0, "eval_every", "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.gradient_clipping >= 0, "gradient_clipping", "must be >= 0 (0 disables clipping)")
        require(self.eval_max_examples is None or self.eval_max_examples >= 1, "eval_max_examples", "must be >= 1")


@dataclass
class ExperimentConfig:
    """A whole experiment: backbone, tasks, MTA placement and the stages to run."""

    model: ModelConfig
    tasks: list[TaskConfig]
    run_name: str = "alter-ds"
    mta: MTAConfig = field(default_factory=MTAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        require(bool(self.tasks), "tasks", "list at least one task")
        require(
            bool(PLAIN_NAME.fullmatch(self.run_name)),
            "run_name",
            f"{self.run_name!r} must be a plain directory name (letters, digits, '.', '_', '-')",
        )
        names = [task.name for task in self.tasks]
        for index, name in enumerate(names):
            require(name not in names[:index], ("tasks", index, "name"), f"duplicate task name {name!r}")
        for task in self.mta.task_experts:
            require(task in names, ("mta", "task_experts", task), f"unknown task {task!r}; tasks are {names}")
        stage_names: list[str] = []
        for index, stage in enumerate(self.stages):
            require(stage.name not in stage_names, ("stages", index, "name"), f"duplicate stage name {stage.name!r}")
            if stage.init_from is not None:
                require(
                    stage.init_from in stage_names,
                    ("stages", index, "init_from"),
                    f"unknown or later stage {stage.init_from!r}; earlier stages are {stage_names}",
                )
            for task in stage.router.routes:
                require(task in names, ("stages", index, "router", "routes", task), f"unknown task {task!r}")
            stage_names.append(stage.name)

    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]


# ----------------------------------------------------------------------------------------- the loader

T = TypeVar("T")


class _Lines:
    """Maps key paths of a YAML document to line numbers (1-based)."""

    def __init__(self, source: str | None, lines: dict[KeyPath, int]):
        self.source = source
        self.lines = lines

    def line(self, key: KeyPath) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get(())

    def error(self, key: KeyPath, message: str) -> ConfigError:
        return ConfigError(message, key, self.source, self.line(key) if self.source else None)


def _yaml_lines(node: yaml.Node, key: KeyPath, out: dict[KeyPath, int], source: str | None = None) -> None:
    """Record the line of every key path; a key given twice in one mapping is an error naming both lines
    (YAML loaders keep the last one silently, so a second ``training:`` would replace the first whole)."""
    out.setdefault(key, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            line = key_node.start_mark.line + 1
            if name in seen:
                raise ConfigError(
                    f"duplicate key (first given on line {seen[name]}, again on line {line})",
                    (*key, name),
                    source,
                    line,
                )
            seen[name] = line
            child = (*key, name)
            out[child] = line
            _yaml_lines(value_node, child, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_lines(item, (*key, index), out, source)


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(hint: Any, value: Any, key: KeyPath, lines: _Lines) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in get_args(hint):
            raise lines.error(key, f"unknown value {value!r}; choose one of {', '.join(map(repr, get_args(hint)))}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise lines.error(key, f"must not be null (expected {_type_name(hint)})")
        errors: list[ConfigError] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, lines)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise lines.error(key, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key, lines)
    if origin is list:
        if not isinstance(value, list):
            raise lines.error(key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_hint,) = get_args(hint)
        return [_convert(item_hint, item, (*key, i), lines) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise lines.error(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_hint, value_hint = get_args(hint)
        return {
            _convert(key_hint, k, (*key, str(k)), lines): _convert(value_hint, v, (*key, str(k)), lines)
            for k, v in value.items()
        }
    if hint is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-3 (no dot) as a string; it is plainly a number here
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise lines.error(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise lines.error(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise lines.error(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config field type {hint!r} is not supported by the loader")


def merge(base: Any, override: Any, where: str) -> Any:
    """``override`` merged into ``base``: mappings key by key; lists of ``stages``/``tasks`` by name (an
    override ``{name: changes}`` changes that entry only)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    merged = dict(base)
    for key, value in override.items():
        if key in ("stages", "tasks") and isinstance(value, dict) and isinstance(base.get(key), list):
            merged[key] = merge_by_name(base[key], value, f"{where}.{key}")
        elif key in base:
            merged[key] = merge(base[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def entry_names(items: list[Any]) -> list[Any]:
    """The ``name`` of each mapping in ``items`` (what ``merge_by_name`` matches overrides against)."""
    return [item.get("name") for item in items if isinstance(item, dict)]


def merge_by_name(items: list[Any], overrides: Mapping[str, Any], where: str) -> list[Any]:
    """``items`` (mappings with a ``name``) with ``overrides[name]`` merged into the entry of that name."""
    names = entry_names(items)
    unknown = [name for name in overrides if name not in names]
    if unknown:
        raise ConfigError(f"{where}: no entry named {unknown[0]!r}; the names are {names}")
    return [merge(item, overrides.get(item.get("name"), {}), f"{where}.{item.get('name')}") for item in items]


#: ``tasks: {suite: NAME, root: DIR, override: {task: {...}}}`` in place of a list: the suites alter-ds defines
TASK_SUITES = ("default", "transfer")
_SUITE_KEYS = ("suite", "root", "override")


def expand_task_suite(data: Any, lines: _Lines | None = None) -> Any:
    """An experiment's raw data with a ``tasks`` suite reference replaced by the suite's task list.

    A suite is defined once, beside the corpora ``prepare-data`` builds it from (``alter_ds.data.prepare.
    suite_tasks``: ``default``, and ``transfer``, the unseen tasks); a config names it and changes what it needs
    by task name::

        tasks:
          suite: default
          root: data/default          # where prepare-data wrote it (the default)
          override:
            imdb: {max_input_tokens: 96}
    """
    lines = lines or _Lines(None, {})
    if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), Mapping):
        return data
    reference = data["tasks"]
    for name in reference:
        if name not in _SUITE_KEYS:
            raise lines.error(("tasks", str(name)), f"unknown key; a task suite takes {', '.join(_SUITE_KEYS)}")
    suite = reference.get("suite")
    if suite not in TASK_SUITES:
        raise lines.error(("tasks", "suite"), f"unknown suite {suite!r}; the suites are {list(TASK_SUITES)}")
    root = reference.get("root", f"data/{suite}")
    if not isinstance(root, str):
        raise lines.error(("tasks", "root"), f"expected a directory, got {root!r}")
    from alter_ds.data.prepare import suite_tasks  # a suite's definition lives with its corpora

    tasks = [config_to_dict(task) for task in suite_tasks(suite, root)]
    override = reference.get("override") or {}
    if not isinstance(override, Mapping):
        raise lines.error(("tasks", "override"), "expected a mapping of task name -> changes")
    names = entry_names(tasks)
    for name in override:  # checked here, before merge_by_name, so that the error points at the override's line
        if name not in names:
            raise lines.error(("tasks", "override", str(name)), f"no task named {name!r}; the suite has {names}")
    tasks = merge_by_name(tasks, override, "tasks.override")
    for index, task in enumerate(tasks):  # a problem in an overridden value points at the override's line
        for field_name in task:
            given = ("tasks", "override", task["name"], field_name)
            if given in lines.lines:
                lines.lines[("tasks", index, field_name)] = lines.lines[given]
    return {**data, "tasks": tasks}


def _build(cls: type[T], data: Any, key: KeyPath, lines: _Lines) -> T:
    if not isinstance(data, Mapping):
        raise lines.error(key, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    if cls is ExperimentConfig:
        data = expand_task_suite(data, lines)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls))}
    for name in data:
        if name not in fields:
            raise lines.error((*key, str(name)), f"unknown key; {cls.__name__} takes {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, spec in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], (*key, name), lines)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise lines.error((*key, name), "missing required key")
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except FieldError as error:
            raise lines.error((*key, *error.key), error.detail) from None
    return instance


def config_from_dict(cls: type[T], data: Any, source: str | None = None) -> T:
    """Build and validate a config dataclass from plain data (e.g. parsed YAML or JSON)."""
    return _build(cls, data, (), _Lines(source, {}))


def load_config(path: str | Path, cls: type[T] = ExperimentConfig) -> T:  # type: ignore[assignment]
    """Read a YAML file into ``cls``; every problem is one ConfigError naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {getattr(error, 'problem', error)}", (), str(path), line) from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _yaml_lines(node, (), lines, str(path))
    return _build(cls, data if data is not None else {}, (), _Lines(str(path), lines))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain data for YAML/JSON, the inverse of ``config_from_dict``."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
