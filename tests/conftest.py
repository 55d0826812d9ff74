"""Shared helpers: tiny MTA models of every architecture, inputs with left padding, a perturbation so that
experts differ (a fresh model's experts are identical or zero, which would hide routing bugs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHITECTURES, PAD, VOCAB, tiny_backbone

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig
from alter_ds.mta import MTAModel

TASKS = [TaskConfig("sentiment", "classify"), TaskConfig("topic", "classify"), TaskConfig("summary", "generate")]


def make_model(arch="gpt2", kind="bottleneck", router=None, shared=0, perturb=0.3, seed=0, **mta):
    mta_config = MTAConfig(
        expert_kind=kind, num_shared_experts=shared, shared_init="pretrained" if kind == "ffn" else "zeros", **mta
    )
    model = MTAModel(tiny_backbone(arch, seed), mta_config, TASKS, router or RouterConfig()).eval()
    if perturb:
        perturb_experts(model, perturb, seed)
    return model


def perturb_experts(model, std=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    for block in model.blocks.values():
        for bank in (block.task_experts, block.shared_experts):
            if bank is not None:
                bank.random_perturb(std, generator)
        with torch.no_grad():
            for parameter in block.router.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def batch_inputs(model, batch=4, length=7, target_length=5, seed=0):
    """input_ids with left padding on row 0 (and decoder inputs for seq2seq)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2] = PAD
    attention_mask[0, :2] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, target_length), generator=generator)
    return inputs


def slice_inputs(inputs, index):
    return {k: v[index : index + 1] for k, v in inputs.items()}


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
