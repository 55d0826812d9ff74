"""Layer experts (the task-level MoE): copies of whole layers equal the backbone at init, dense mixing in
training equals argmax execution at inference for one-hot routes, the KV cache (greedy and beam search) agrees
with a backbone holding the chosen copy, and the artefact, export, new tasks and expert resets keep them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TASKS, batch_inputs
from tiny_models import tiny_backbone

from alter_ds.config import ConfigError, MTAConfig, RouterConfig, StageConfig, config_from_dict
from alter_ds.errors import UsageError
from alter_ds.mta import MTAModel
from alter_ds.mta.layer_experts import LayerBank, LayerExpertBlock

ARCHS = ["llama", "gpt2", "t5", "bart"]  # the seven other families: tests/test_architectures.py
COPIES = 3


def layer_model(arch, router=None, perturb=0.05, noise=1e-8, **mta):
    backbone = tiny_backbone(arch)
    reference = copy.deepcopy(backbone)
    config = MTAConfig(expert_kind="layer", num_task_experts=COPIES, layer_noise=noise, **mta)
    model = MTAModel(backbone, config, TASKS, router or RouterConfig(kind="hard")).eval()
    if perturb:
        generator = torch.Generator().manual_seed(1)
        for block in model.blocks.values():
            block.task_experts.random_perturb(perturb, generator)
    return model, reference


@pytest.mark.parametrize("arch", ARCHS)
def test_copies_start_as_the_pretrained_layer(arch):
    model, reference = layer_model(arch, perturb=0.0)
    assert model.blocks and all(isinstance(b, LayerExpertBlock) for b in model.blocks.values())
    inputs = batch_inputs(model, batch=3)
    with torch.no_grad():
        got = model(**inputs, task_ids=[0, 1, 2]).logits
        expected = reference(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    block = next(iter(model.blocks.values()))
    first, second = block.task_experts.experts[0], block.task_experts.experts[1]
    differences = [(a - b).abs().max() for a, b in zip(first.parameters(), second.parameters())]
    assert 0 < max(float(d.detach()) for d in differences) < 1e-6  # the noise breaks symmetry at about 1e-8


def test_training_mixes_every_copy_and_inference_runs_only_the_routed_one():
    model, _ = layer_model("llama")
    calls: list[int] = []
    for block in model.blocks.values():
        for number, expert in enumerate(block.task_experts.experts):
            expert.register_forward_hook(lambda *_, number=number: calls.append(number))
    inputs = batch_inputs(model, batch=3)
    model.train()
    dense = model(**inputs, task_ids=[1, 1, 1]).logits
    assert sorted(calls) == sorted([0, 1, 2] * 2)  # all three copies, in both layers
    calls.clear()
    model.eval()
    with torch.no_grad():
        argmax = model(**inputs, task_ids=[1, 1, 1]).logits
    assert calls == [1, 1]  # task 1's copy only, once per layer
    calls.clear()
    model(**inputs, task_ids=[1, 1, 1])  # eval mode but gradients on: still dense (a backward may follow)
    assert sorted(calls) == sorted([0, 1, 2] * 2)
    torch.testing.assert_close(argmax, dense.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_mixed_batch_equals_each_example_alone(arch):
    model, _ = layer_model(arch)
    inputs = batch_inputs(model, batch=3)
    with torch.no_grad():
        batch = model(**inputs, task_ids=[2, 0, 1]).logits
        for row, task in enumerate([2, 0, 1]):
            alone = model(**{k: v[row : row + 1] for k, v in inputs.items()}, task_ids=[task]).logits
            torch.testing.assert_close(batch[row : row + 1], alone, rtol=0, atol=1e-5)


def with_copy(reference, model, task):
    """The reference backbone with every replaced layer holding the copy ``task`` routes to (hard router)."""
    backbone = copy.deepcopy(reference)
    for name, block in model.blocks.items():
        stack, index = name.split(".")
        layers = next(s.layers for s in _stacks(backbone) if s.name == stack)
        chosen = block.task_experts.experts[model.layout.task_experts[task][0]]
        layers[int(index)].load_state_dict(chosen.state_dict())
    return backbone


def _stacks(backbone):
    from alter_ds.mta.inject import find_stacks

    return find_stacks(backbone)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_with_the_cache_matches_a_backbone_holding_the_chosen_copy(arch, beams):
    model, reference = layer_model(arch)
    inputs = batch_inputs(model, batch=3)
    inputs.pop("decoder_input_ids", None)
    options = dict(max_new_tokens=6, do_sample=False, num_beams=beams)
    mixed = model.generate(**inputs, task_ids=[0, 1, 2], **options)
    for row, task in enumerate([0, 1, 2]):
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        expected = with_copy(reference, model, task).generate(**alone, **options)
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0]), (task, mixed[row], expected[0])
    uncached = model.generate(**inputs, task_ids=[0, 1, 2], use_cache=False, **options)
    assert torch.equal(mixed, uncached)


def test_straight_through_routes_train_the_router_through_dense_copies():
    router = RouterConfig(kind="task_embedding", mode="st_gumbel", temperature=2.0, task_embedding_dim=8)
    model, _ = layer_model("llama", router=router)
    model.set_trainable(["task_experts", "router", "task_embeddings"])
    model.train()
    inputs = batch_inputs(model, batch=4)
    torch.manual_seed(0)
    model(**inputs, labels=inputs["input_ids"], task_ids=[0, 1, 2, 0]).loss.backward()
    assert torch.count_nonzero(model.task_embeddings.weight.grad) > 0
    for block in model.blocks.values():
        assert all(torch.count_nonzero(p.grad) > 0 for p in block.router.parameters())
        used = [any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in e.parameters())
                for e in block.task_experts.experts]  # fmt: skip
        assert any(used)


def test_save_load_export_and_a_new_task(tmp_path):
    model, _ = layer_model("llama")
    inputs = batch_inputs(model, batch=3)
    with torch.no_grad():
        expected = model(**inputs, task_ids=[0, 1, 2]).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = MTAModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, task_ids=[0, 1, 2]).logits, expected, rtol=0, atol=1e-6)
    model.export_task(tmp_path / "topic", "topic", check_inputs=inputs, tolerance=1e-5)
    exported = MTAModel.from_pretrained(tmp_path / "topic")
    assert all(b.task_experts.num_experts == 1 for b in exported.blocks.values())  # the one copy topic uses
    new = model.add_task("qa", "generate")
    block = next(iter(model.blocks.values()))
    assert block.task_experts.num_experts == COPIES + 1
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, task_ids=[0, 1, 2]).logits, expected, rtol=0, atol=1e-6)
        model(**inputs, task_ids=[new] * 3)


def test_a_saved_backbone_keeps_the_pretrained_layer_and_reset_goes_back_to_it(tmp_path):
    model, reference = layer_model("llama")
    model.set_trainable(["backbone", "task_experts"])  # a trained backbone is saved by value
    model.save_pretrained(tmp_path / "saved")
    loaded = MTAModel.from_pretrained(tmp_path / "saved").eval()
    for name, block in loaded.blocks.items():
        original = model.blocks[name].task_experts.pretrained_layer().state_dict()
        for key, tensor in block.task_experts.pretrained_layer().state_dict().items():
            assert torch.equal(tensor, original[key]), (name, key)
    loaded.apply_stage(StageConfig(name="again", router=RouterConfig(kind="hard"), reset_experts=True))
    inputs = batch_inputs(loaded, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs, task_ids=[0, 1, 2]).logits, reference(**inputs).logits, rtol=0, atol=1e-5
        )


def test_layer_expert_configs_are_checked():
    with pytest.raises(ConfigError, match="num_task_experts"):
        config_from_dict(MTAConfig, {"expert_kind": "layer"}, "m.yaml")
    with pytest.raises(ConfigError, match="num_shared_experts"):
        config_from_dict(MTAConfig, {"expert_kind": "layer", "num_task_experts": 2, "num_shared_experts": 1}, "m.yaml")
    with pytest.raises(ConfigError, match="replace_layer needs expert_kind: layer"):
        config_from_dict(MTAConfig, {"position": "replace_layer"}, "m.yaml")
    with pytest.raises(UsageError, match="example-level router"):
        layer_model("llama", router=RouterConfig(kind="token"))
    model, _ = layer_model("llama")
    with pytest.raises(UsageError, match="no shared experts"):
        model.add_shared_experts(1)
    assert isinstance(next(iter(model.blocks.values())).task_experts, LayerBank)
