"""Loading the backbone through the real Hugging Face paths (hub id, local directory or GGUF file)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alter_ds.config import ModelConfig
from alter_ds.errors import MissingFileError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hub_options(config: ModelConfig) -> dict[str, Any]:
    """What ``from_pretrained`` needs besides the name: revision and GGUF file, when given."""
    options: dict[str, Any] = {"revision": config.revision} if config.revision else {}
    if config.gguf_file:
        options["gguf_file"] = config.gguf_file
    return options


def model_class_for(kind: str, hf_config: Any) -> Any:
    """AutoModelForSeq2SeqLM for encoder-decoder configs (or kind: seq2seq), AutoModelForCausalLM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if kind == "seq2seq" or (kind == "auto" and getattr(hf_config, "is_encoder_decoder", False)):
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM


def load_backbone(config: ModelConfig) -> nn.Module:
    """The pretrained model named by ``config``; a GGUF checkpoint is dequantised and made serialisable."""
    from transformers import AutoConfig

    options = _hub_options(config)
    try:
        hf_config = AutoConfig.from_pretrained(config.name_or_path, **options)
    except (OSError, ValueError) as error:
        raise MissingFileError(
            f"model.name_or_path {config.name_or_path!r}: cannot load its config ({error}). "
            f"Give a local directory or a model id reachable from this machine."
        ) from None
    model_class = model_class_for(config.kind, hf_config)
    model = model_class.from_pretrained(config.name_or_path, dtype=DTYPES[config.dtype], **options)
    if config.gguf_file:
        # Weights are dequantised already; without this save_pretrained refuses a "quantized" model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model  # type: ignore[no-any-return]


def backbone_from_config_dir(path: str) -> nn.Module:
    """A randomly initialised backbone of the architecture saved in ``path`` (weights loaded afterwards)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    return model_class_for("auto", hf_config).from_config(hf_config)  # type: ignore[no-any-return]


def is_seq2seq(config: ModelConfig) -> bool:
    """Whether the configured model is encoder-decoder (``kind``, or its Hugging Face config when ``auto``)."""
    if config.kind != "auto":
        return config.kind == "seq2seq"
    from transformers import AutoConfig

    return bool(AutoConfig.from_pretrained(config.name_or_path, **_hub_options(config)).is_encoder_decoder)


def load_tokenizer(config: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token (the eos token when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.name_or_path, **_hub_options(config))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
