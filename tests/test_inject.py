"""Injection into stock T5, BART, GPT-2 and Llama: equivalence at init, routing semantics, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TASKS, batch_inputs, make_model, slice_inputs
from tiny_models import tiny_backbone

from alter_ds.config import MTAConfig, RouterConfig, TaskConfig
from alter_ds.mta import InjectionError, MTAModel
from alter_ds.mta.inject import MTAWrapped, identify_activation

# Outputs of paths that compute the same function in a different order agree to float32 rounding.
TOL = dict(rtol=1e-5, atol=1e-5)
ROUTERS = ["hard", "task_weights", "gate", "token", "uniform", "fixed", "random"]


def router_config(kind):
    extra = {"routes": {"sentiment": [1], "topic": [0, 2]}} if kind == "fixed" else {}
    if kind == "token":
        extra["task_embedding_dim"] = 4
    return RouterConfig(kind=kind, **extra)


@pytest.mark.parametrize(
    "kind, position", [("bottleneck", "default"), ("bottleneck", "after_attention"), ("ffn", "default")]
)
def test_injected_model_at_init_equals_backbone(arch, kind, position):
    backbone = tiny_backbone(arch)
    reference = copy.deepcopy(backbone)
    mta = MTAConfig(expert_kind=kind, num_shared_experts=1, shared_init="pretrained")
    if position != "default":
        mta.position = position
    router = RouterConfig(kind="task_weights", temperature=0.1) if kind == "ffn" else RouterConfig(kind="hard")
    model = MTAModel(backbone, mta, TASKS, router).eval()
    inputs = batch_inputs(model)
    expected = reference(**inputs).logits
    got = model(**inputs, task_ids=[0, 1, 2, 1]).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert len(model.blocks) == (4 if model.is_encoder_decoder else 2)


@pytest.mark.parametrize("kind", ["bottleneck", "ffn"])
def test_hard_routing_equals_a_model_carrying_that_expert_alone(arch, kind):
    model = make_model(arch, kind, RouterConfig(kind="hard"))
    inputs = batch_inputs(model)
    for task in range(len(TASKS)):
        single = MTAModel(tiny_backbone(arch), MTAConfig(expert_kind=kind), [TaskConfig("only")]).eval()
        for name, block in single.blocks.items():
            source = model.blocks[name].task_experts
            with torch.no_grad():
                for target, origin in zip(block.task_experts.weights(), source.weights()):
                    if target is not None:
                        target.copy_(origin[task : task + 1])
        expected = single(**inputs, task_ids=[0] * 4).logits
        got = model(**inputs, task_ids=[task] * 4).logits
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("router", ROUTERS)
def test_mixed_task_batch_equals_each_example_alone(arch, router):
    shared = 1 if router == "gate" else 0
    model = make_model(arch, "bottleneck", router_config(router), shared=shared)
    inputs = batch_inputs(model)
    task_ids = torch.tensor([2, 0, 1, 0])
    batch_logits = model(**inputs, task_ids=task_ids).logits
    for i in range(4):
        alone = model(**slice_inputs(inputs, i), task_ids=task_ids[i : i + 1]).logits
        torch.testing.assert_close(batch_logits[i : i + 1], alone, **TOL)
    if router not in ("uniform", "random"):  # those two ignore the task (random may collide by chance)
        other = model(**inputs, task_ids=torch.tensor([1, 2, 0, 1])).logits
        assert not torch.allclose(other, batch_logits), "routing by task must change the output"


def test_ffn_experts_copy_gated_and_plain_feed_forwards():
    for arch in ("llama", "t5_gated", "gpt2", "bart"):
        model = make_model(arch, "ffn", perturb=0)
        block = next(iter(model.blocks.values()))
        expected = {"llama": "swiglu", "t5_gated": "geglu_tanh", "gpt2": "gelu_tanh", "bart": "gelu"}[arch]
        assert block.task_experts.activation == expected
        assert block.task_experts.num_experts == len(TASKS)
        assert torch.equal(block.task_experts.w_down[0], block.task_experts.w_down[2])


def test_wrapped_projection_exposes_base_attributes():
    model = make_model("t5", "bottleneck")
    wrapped = model.backbone.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wrapped, MTAWrapped)
    assert wrapped.weight is wrapped.base_layer.weight  # T5 reads wo.weight.dtype


def test_layer_selection_and_stacks():
    model = make_model("t5", "ffn", layers="middle")
    assert sorted(model.blocks) == ["decoder.1", "encoder.1"]
    model = make_model("bart", "bottleneck", layers=[0], decoder_layers="none")
    assert sorted(model.blocks) == ["encoder.0"]
    with pytest.raises(InjectionError, match="layer 5 out of range"):
        make_model("gpt2", layers=[5])


def test_unknown_architecture_names_what_is_missing():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stuff = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(InjectionError, match="no transformer layer list found in Odd"):
        MTAModel(Odd(), MTAConfig(), TASKS)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(4, 4)

    class NoFFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

    with pytest.raises(
        InjectionError,
        match=r"no feed-forward sub-layer found in Layer \(children found: "
        r"\{'Layer': \['mixer'\]\}\)",
    ):
        MTAModel(NoFFN(), MTAConfig(), TASKS)


def test_activation_identification():
    assert identify_activation(torch.nn.SiLU(), gated=True) == "swiglu"
    assert identify_activation(torch.nn.GELU(approximate="tanh"), gated=False) == "gelu_tanh"
    with pytest.raises(InjectionError, match="matches none"):
        identify_activation(torch.nn.Tanh(), gated=False)
