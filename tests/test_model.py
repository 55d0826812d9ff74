"""MTAModel: task ids, stages as configuration, trainable groups, save/load and single-task export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TASKS, batch_inputs, make_model, perturb_experts
from tiny_models import tiny_backbone

from alter_ds.config import AddExpertsConfig, MTAConfig, RouterConfig, StageConfig
from alter_ds.mta import MTAModel

TOL = dict(rtol=1e-5, atol=1e-5)


def loss_of(model, inputs, task_ids):
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    return model(**inputs, labels=labels, task_ids=task_ids).loss


def gradients_by_group(model):
    found = {}
    for group, _, parameter in model.named_parameter_groups():
        has = parameter.grad is not None and bool(torch.count_nonzero(parameter.grad))
        found[group] = found.get(group, False) or has
    return found


@pytest.mark.parametrize(
    "train, expected",
    [
        (["task_experts", "shared_experts"], {"task_experts", "shared_experts"}),
        (["router"], {"router"}),
        (["backbone", "task_experts", "router"], {"backbone", "task_experts", "router"}),
    ],
)
def test_only_the_groups_a_stage_trains_receive_gradients(arch, train, expected):
    model = make_model(arch, "bottleneck", shared=1)
    stage = StageConfig(name="s", router=RouterConfig(kind="task_weights"), train=train)
    counts = model.apply_stage(stage)
    model.train()
    loss_of(model, batch_inputs(model), [0, 1, 2, 0]).backward()
    got = {group for group, has in gradients_by_group(model).items() if has}
    assert got == expected
    assert {g for g, (trainable, _) in counts.items() if trainable} == expected
    for group, _, parameter in model.named_parameter_groups():
        if group not in expected:
            assert parameter.grad is None and not parameter.requires_grad


def test_name_patterns_and_unknown_entries():
    model = make_model("llama")
    counts = model.set_trainable(["*norm*"])
    assert counts["backbone"][0] > 0 and counts["task_experts"][0] == 0
    assert all("norm" in name for _, name, p in model.named_parameter_groups() if p.requires_grad)
    with pytest.raises(ValueError, match="matches no parameter group"):
        model.set_trainable(["no_such_*"])
    table = model.format_parameter_counts()
    assert "task_experts" in table and "all" in table


def test_two_stage_presets_on_a_tiny_model():
    """alter-paper: ffn experts, task weights selector; stage 2 adds a shared expert (pretrained) and the gate."""
    model = make_model("t5", "ffn", RouterConfig(kind="task_weights", temperature=0.1), perturb=0, layers="middle")
    inputs = batch_inputs(model)
    base = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    stage2 = StageConfig(
        name="stage2",
        router=RouterConfig(kind="gate", temperature=0.1),
        add_experts=AddExpertsConfig(shared=1, init="pretrained"),
        train=["task_experts", "shared_experts", "router"],
        init_from="stage1",
    )
    counts = model.apply_stage(stage2)
    assert counts["backbone"][0] == 0 and counts["shared_experts"][0] > 0
    block = model.blocks["encoder.1"]
    assert block.shared_experts.num_experts == 1
    # a pretrained copy mixed by a gate that sums to one: the model is still the backbone
    torch.testing.assert_close(model(**inputs, task_ids=[0, 1, 2, 0]).logits, base, **TOL)


def test_stage_two_carries_task_logits_into_the_gate():
    model = make_model("gpt2", router=RouterConfig(kind="task_weights"))
    with torch.no_grad():
        for block in model.blocks.values():
            block.router.task_logits.copy_(torch.arange(9.0).reshape(3, 3))
    model.add_shared_experts(1)
    model.set_router(RouterConfig(kind="gate"))
    for block in model.blocks.values():
        assert torch.equal(block.router.task_logits, torch.arange(9.0).reshape(3, 3))


@pytest.mark.parametrize("router", ["hard", "task_weights", "gate", "token", "random"])
def test_save_and_load_round_trip(tmp_path, arch, router):
    shared = 1 if router == "gate" else 0
    model = make_model(arch, "ffn" if arch == "llama" else "bottleneck", RouterConfig(kind=router), shared=shared)
    model.set_step(7)
    inputs = batch_inputs(model)
    expected = model(**inputs, task_ids=[0, 1, 2, 1]).logits
    model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "backbone",
        "mta.safetensors",
        "mta_config.json",
        "tasks.json",
    ]
    tasks = json.loads((tmp_path / "model" / "tasks.json").read_text())
    assert [t["name"] for t in tasks] == [t.name for t in TASKS] and tasks[2]["category"] == "generate"
    loaded = MTAModel.from_pretrained(tmp_path / "model").eval()
    assert loaded.context.step == 7
    got = loaded(**inputs, task_ids=["sentiment", "topic", 2, 1]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["hard", "task_weights", "gate", "token", "fixed"])
def test_export_task_matches_the_full_model_on_that_task(tmp_path, arch, router):
    shared = 1 if router in ("gate", "hard") else 0
    extra = {"routes": {"sentiment": [1, 2], "topic": [0], "summary": [2]}} if router == "fixed" else {}
    config = RouterConfig(kind=router, top_k=2 if router == "task_weights" else None, **extra)
    model = make_model(arch, "bottleneck", config, shared=shared)
    inputs = batch_inputs(model)
    for task in ("sentiment", "summary"):
        expected = model(**inputs, task_ids=[task] * 4).logits
        model.export_task(tmp_path / task, task, check_inputs=inputs)
        exported = MTAModel.from_pretrained(tmp_path / task).eval()
        assert exported.task_names == [task]
        torch.testing.assert_close(exported(**inputs, task_ids=[0] * 4).logits, expected, **TOL)
        if router in ("hard", "task_weights", "fixed"):
            kept = next(iter(exported.blocks.values())).task_experts.num_experts
            assert kept < model.layout.num_experts  # unused experts dropped


def test_add_task_later_gets_its_own_expert():
    model = make_model("gpt2", router=RouterConfig(kind="hard"))
    inputs = batch_inputs(model)
    before = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    task = model.add_task("new", "classify", init="expert", source_expert=1)
    assert task == 3 and model.layout.num_task_experts == 4
    torch.testing.assert_close(model(**inputs, task_ids=[0, 1, 2, 0]).logits, before, **TOL)
    torch.testing.assert_close(
        model(**inputs, task_ids=["new"] * 4).logits, model(**inputs, task_ids=[1] * 4).logits, **TOL
    )
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("new")


@pytest.mark.parametrize(
    "router",
    [
        RouterConfig(kind="task_weights"),
        RouterConfig(kind="token", task_embedding_dim=3),
        RouterConfig(kind="task_embedding", task_embedding_dim=3),
    ],
    ids=lambda r: r.kind,
)
def test_add_task_keeps_each_experts_learned_routing_when_the_shared_ones_move_up(router):
    """A new task's expert goes after the task experts, so every shared expert's index grows by one; what a
    router learned for a shared expert must move with it, not land on the new task's expert."""
    model = make_model("gpt2", router=router, shared=2)  # perturbed: every router tensor differs per expert
    before = {name: block.router.state_dict() for name, block in model.blocks.items()}
    before = {name: {k: v.clone() for k, v in state.items()} for name, state in before.items()}
    model.add_task("new", "classify")
    assert model.layout.num_task_experts == 4 and model.layout.shared_experts == [4, 5]
    moved = {0: 0, 1: 1, 2: 2, 3: 4, 4: 5}  # old expert -> its index now
    for name, block in model.blocks.items():
        state, axes = block.router.state_dict(), block.router.expert_axes()
        assert axes, "the router names its expert axes"
        for key, axis in axes.items():
            assert state[key].shape[axis] == 6, key
            for old, new in moved.items():
                old_slice = before[name][key].select(axis, old)
                new_slice = state[key].select(axis, new)
                rows = min(old_slice.shape[0], new_slice.shape[0]) if old_slice.dim() else None
                if rows is None:
                    assert torch.equal(new_slice, old_slice), (name, key, old)
                else:  # a per-task tensor gained the new task's row
                    assert torch.equal(new_slice[:rows], old_slice[:rows]), (name, key, old)


@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, "task_ids is required"),
        ([0, 1, 5, 0], "task id 5 out of range"),
        ([0, -1, 0, 0], "task id -1 out of range"),
        (["sentiment", "nope", 0, 0], "unknown task 'nope'"),
        ([0, 1], "task_ids has 2 entries for a batch of 4"),
        (torch.zeros(4, 1, dtype=torch.long), "must be 1-D"),
        (torch.zeros(4), "must be integers"),
    ],
)
def test_bad_task_ids_give_clear_errors(task_ids, message):
    model = make_model("gpt2")
    with pytest.raises(ValueError, match=message):
        model(**batch_inputs(model), task_ids=task_ids)


def test_bare_backbone_call_explains_itself():
    model = make_model("gpt2")
    with pytest.raises(RuntimeError, match="without task ids"):
        model.backbone(**batch_inputs(model))


def test_loading_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mta_config\.json is missing"):
        MTAModel.from_pretrained(tmp_path)


def test_save_is_atomic_and_replaces_an_old_model(tmp_path):
    model = make_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_check_catches_a_mismatch(tmp_path, monkeypatch):
    model = make_model("gpt2", router=RouterConfig(kind="hard"))
    inputs = batch_inputs(model)
    real = MTAModel.from_pretrained

    def tampered(*args, **kwargs):
        loaded = real(*args, **kwargs)
        perturb_experts(loaded, 1.0, seed=5)
        return loaded

    monkeypatch.setattr(MTAModel, "from_pretrained", tampered)
    with pytest.raises(ValueError, match="differs from the full model"):
        model.export_task(tmp_path / "x", "topic", check_inputs=inputs)


def test_five_experts_for_three_tasks_with_a_prior_map():
    """The official code's layout: 5 task experts for 3 tasks, each task assigned some of them."""
    router = RouterConfig(kind="hard")
    model = make_model("bart", "ffn", router, num_task_experts=5, task_experts={"sentiment": [0, 1], "topic": [2, 3]})
    assert model.layout.task_experts == [[0, 1], [2, 3], [2]]
    block = next(iter(model.blocks.values()))
    assert block.task_experts.num_experts == 5
    mixture = block.router.task_mixture()
    assert mixture[0].tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]


def test_bfloat16_model_runs_and_stays_close():
    model = make_model("llama", "bottleneck", RouterConfig(kind="task_weights"))
    inputs = batch_inputs(model)
    expected = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    got = model.to(torch.bfloat16)(**inputs, task_ids=[0, 1, 2, 0]).logits
    assert got.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; logits of this tiny model are O(1)
    torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)


def test_zero_initialised_shared_experts_start_silent_but_learn():
    """A 'zeros' shared FFN expert adds nothing at first yet receives gradients (not a dead all-zero expert)."""
    model = make_model("llama", "ffn", RouterConfig(kind="hard"), perturb=0)
    inputs = batch_inputs(model)
    before = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    model.add_shared_experts(1, init="zeros")
    model.set_router(RouterConfig(kind="uniform"))
    model.set_trainable(["shared_experts"])
    logits = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    assert not torch.allclose(logits, before)  # the uniform mix now gives the silent expert 1/4
    logits.square().mean().backward()
    block = next(iter(model.blocks.values()))
    assert torch.count_nonzero(block.shared_experts.w_up.grad) > 0


def test_saved_backbone_keeps_the_pretrained_ffn_for_later_experts(tmp_path):
    """alter-paper: stage 1 trains the backbone (so it is saved) and replaces the FFN; stage 2 adds a shared
    expert initialised from the pretrained FFN, which must be the original one, not a fresh random init."""
    model = make_model("t5", "ffn", RouterConfig(kind="task_weights", temperature=0.1), perturb=0.2, layers="middle")
    original = model.blocks["encoder.1"].task_experts.pretrained().w_in.clone()
    model.set_trainable(["backbone", "task_experts", "router"])
    model.save_pretrained(tmp_path / "stage1")
    assert (tmp_path / "stage1" / "backbone").is_dir()
    loaded = MTAModel.from_pretrained(tmp_path / "stage1")
    loaded.add_shared_experts(1, init="pretrained")
    torch.testing.assert_close(loaded.blocks["encoder.1"].shared_experts.w_down[0], original, rtol=0, atol=0)


def test_layers_none_is_the_bare_backbone_that_trains_saves_and_exports(tmp_path):
    """The full fine-tuning baseline: no MTA block, the whole backbone trainable, the artefact round-trips."""
    from tiny_models import tiny_backbone

    model = MTAModel(tiny_backbone("llama"), MTAConfig(layers="none"), TASKS)
    reference = tiny_backbone("llama")
    assert model.blocks == {}
    counts = model.set_trainable(["backbone"])
    assert counts["backbone"][0] == counts["backbone"][1] > 0
    inputs = {"input_ids": torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(0))}
    expected = reference(**inputs).logits
    torch.testing.assert_close(model(**inputs, task_ids=[0, 2]).logits, expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "model")
    loaded = MTAModel.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(loaded(**inputs, task_ids=[1, 1]).logits, expected, rtol=0, atol=0)
    model.export_task(tmp_path / "export", "topic", check_inputs=inputs)
    with pytest.raises(ValueError, match="say layers: none"):
        MTAModel(tiny_backbone("llama"), MTAConfig(layers=[]), TASKS)


def test_a_stage_after_backbone_training_saves_the_trained_backbone_not_the_reference(tmp_path):
    """alter-paper: stage 1 trains the backbone, stage 2 only the MTA module. Stage 2's export must carry stage
    1's backbone; a reference to the pretrained model would silently undo stage 1's backbone training."""
    from tiny_models import tiny_backbone

    from alter_ds.config import ModelConfig

    tiny_backbone("llama").save_pretrained(tmp_path / "pretrained")
    reference = dataclasses.asdict(ModelConfig(name_or_path=str(tmp_path / "pretrained")))
    model = MTAModel(tiny_backbone("llama"), MTAConfig(), TASKS, backbone_reference=reference)
    model.set_trainable(["backbone", "task_experts"])
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.add_(0.1)  # what stage 1's training did to the backbone
    model.save_pretrained(tmp_path / "stage1")
    stage2 = MTAModel.from_pretrained(tmp_path / "stage1")
    stage2.set_trainable(["router", "task_experts"])  # the backbone is frozen now
    stage2.save_pretrained(tmp_path / "stage2")
    assert json.loads((tmp_path / "stage2" / "mta_config.json").read_text())["backbone_saved"]
    final = MTAModel.from_pretrained(tmp_path / "stage2")
    inputs = batch_inputs(model)
    expected = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    torch.testing.assert_close(final(**inputs, task_ids=[0, 1, 2, 0]).logits, expected, rtol=0, atol=0)


def test_the_routing_lasts_for_one_call_only(arch):
    """Task ids are set on entry to ``forward`` and cleared on exit: a later bare backbone call fails clearly
    instead of routing with stale ids (which ``rows`` would repeat for any multiple of the old batch)."""
    model = make_model(arch, router=RouterConfig(kind="gate"), shared=1)
    inputs = batch_inputs(model)
    model(**inputs, task_ids=[0, 1, 2, 0])
    assert model.context.task_ids is None and model.context.prompt_mask is None
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    for bare in (inputs, doubled):
        with pytest.raises(RuntimeError, match="ran without task ids"):
            model.backbone(**bare)
    with pytest.raises(ValueError):  # an error inside the call clears the routing too
        model(**inputs, task_ids=[0, 1, 9, 0])
    assert model.context.task_ids is None


@pytest.mark.parametrize("router", ["hard", "gate", "token"])
def test_activation_checkpointing_recomputes_each_layer_with_its_forwards_routing(arch, router):
    """Backward recomputes checkpointed layers after ``forward`` has returned and cleared the routing: the
    recompute replays it, so the loss and every gradient equal the run without checkpointing, and routing
    usage is counted once."""
    reference = make_model(arch, router=RouterConfig(kind=router), shared=1)
    checkpointed = MTAModel(tiny_backbone(arch, 0), reference.mta_config, TASKS, reference.router_config)
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable()
    inputs = batch_inputs(reference)
    task_ids = [0, 1, 2, 0]
    results = []
    for model in (reference, checkpointed):
        model.train()
        model.set_trainable(["backbone", "task_experts", "shared_experts", "router"])
        loss = loss_of(model, inputs, task_ids)
        loss.backward()
        usage = {name: block.usage(reset=False) for name, block in model.blocks.items()}
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, usage))
    (loss_a, grads_a, usage_a), (loss_b, grads_b, usage_b) = results
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_b.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=name)
    for name in usage_a:
        torch.testing.assert_close(usage_b[name], usage_a[name], **TOL, msg=name)


def test_the_expert_stack_is_kept_while_no_gradient_can_reach_the_experts():
    """With shared experts the op's weights are a concatenation: kept across forwards when the experts are
    frozen or gradients are off, rebuilt after any in-place change, and never kept while experts train."""
    model = make_model("llama", shared=1)
    block = next(iter(model.blocks.values()))
    inputs = batch_inputs(model)
    model.set_trainable(["router"])
    first = block.expert_weights()
    assert block.expert_weights()[0] is first[0]  # reused
    before = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    with torch.no_grad():
        block.shared_experts.w_up.add_(0.5)  # an in-place change, as an optimizer step makes
    rebuilt = block.expert_weights()
    assert rebuilt[0] is not first[0]
    torch.testing.assert_close(rebuilt[2][-1], block.shared_experts.w_up[0], rtol=0, atol=0)
    after = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    assert not torch.allclose(before, after)
    model.set_trainable(["shared_experts"])
    model.train()
    loss_of(model, inputs, [0, 1, 2, 0]).backward()
    assert block._stack is None and block.shared_experts.w_up.grad is not None
    assert bool(block.shared_experts.w_up.grad.abs().sum() > 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("kind", ["bottleneck", "ffn", "layer"])
def test_pretrained_only_computes_the_backbone_whatever_the_experts_learned(arch, kind):
    import copy

    from tiny_models import tiny_backbone

    from alter_ds.mta.layer_experts import LayerBank

    backbone = tiny_backbone(arch)
    reference = copy.deepcopy(backbone)
    extra = {"num_task_experts": 3} if kind == "layer" else {"num_shared_experts": 1}
    mta = MTAConfig(expert_kind=kind, shared_init="pretrained" if kind == "ffn" else "zeros", **extra)
    model = MTAModel(backbone, mta, TASKS, RouterConfig(kind="hard")).eval()
    perturb_experts(model, 0.3)
    inputs = batch_inputs(model)
    with torch.no_grad():
        trained = model(**inputs, task_ids=[0, 1, 2, 0]).logits
        with model.pretrained_only():
            bypassed = model(**inputs, task_ids=[0, 1, 2, 0]).logits
        expected = reference(**inputs).logits
        after = model(**inputs, task_ids=[0, 1, 2, 0]).logits
    assert not torch.allclose(trained, expected, atol=1e-3)  # the experts do change the model
    torch.testing.assert_close(bypassed, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, trained, rtol=0, atol=0)  # and the routing comes back afterwards
    for block in model.blocks.values():
        if isinstance(block.task_experts, LayerBank):
            assert next(block.task_experts.pretrained_layer().parameters()).device.type == "cpu"
