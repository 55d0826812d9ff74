"""The task-level MoE router: one task-embedding table per model, a per-layer MLP over it, Gumbel variants,
its artefact and export, a new task's row, per-group learning rates, and the table initialised from inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TASKS, batch_inputs, make_model, perturb_experts
from tiny_models import tiny_backbone

from alter_ds.config import ExperimentConfig, ModelConfig, MTAConfig, RouterConfig, StageConfig
from alter_ds.data.collate import MultiTaskCollator, TokenizedExample
from alter_ds.errors import UsageError
from alter_ds.mta import MTAModel
from alter_ds.mta.routers import TaskEmbeddingRouter
from alter_ds.mta.task_embeddings import init_from_inputs

ROUTER = RouterConfig(kind="task_embedding", task_embedding_dim=6, gate_hidden=5, temperature=0.5)


def reference_logits(router: TaskEmbeddingRouter, table: torch.Tensor) -> torch.Tensor:
    """embedding -> Linear -> GELU -> Linear, written out with the router's weights."""
    first, second = router.mlp[0], router.mlp[2]
    return F.linear(F.gelu(F.linear(table, first.weight, first.bias)), second.weight, second.bias)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_every_layer_reads_one_table_through_its_own_mlp(arch):
    model = make_model(arch, router=ROUTER, shared=1)
    table = model.task_embeddings
    assert table is not None and tuple(table.weight.shape) == (len(TASKS), 6)
    routers = [block.router for block in model.blocks.values()]
    assert all(isinstance(r, TaskEmbeddingRouter) for r in routers) and len(routers) >= 2
    groups = {name: group for group, name, _ in model.named_parameter_groups()}
    assert groups["task_embeddings.weight"] == "task_embeddings"
    assert sum(1 for name in groups if "task_embeddings" in name) == 1  # not one copy per layer
    for block in model.blocks.values():
        expected = F.softmax(reference_logits(block.router, table.weight) / 0.5, dim=-1)
        torch.testing.assert_close(block.router.task_mixture(0), expected, rtol=1e-6, atol=1e-6)
    # two layers' MLPs differ (perturbed), so their routes do too: each layer routes on its own
    mixtures = [r.task_mixture(0) for r in routers]
    assert not torch.allclose(mixtures[0], mixtures[1])


def test_straight_through_gumbel_is_one_hot_forward_and_trains_the_table_and_mlps():
    config = RouterConfig(kind="task_embedding", mode="st_gumbel", temperature=2.0, task_embedding_dim=6)
    model = make_model("llama", router=config, shared=1).train()
    model.set_trainable(["router", "task_embeddings"])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block in model.blocks.values():
        route = block.route
        block.route = lambda hidden, route=route: seen.append(route(hidden)) or seen[-1]  # type: ignore[method-assign]
    inputs = batch_inputs(model, batch=4)
    torch.manual_seed(0)
    tasks = [0, 2, 0, 2]  # task 1 is absent from the batch
    model(**inputs, labels=inputs["input_ids"], task_ids=tasks).loss.backward()
    for ids, weights in seen:
        assert ids.shape == (4, 1) and torch.all(weights == 1.0)  # one expert per example, weight 1 forward
    grad = model.task_embeddings.weight.grad
    assert grad is not None
    assert torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[2]) > 0
    assert torch.count_nonzero(grad[1]) == 0  # only the batch's tasks move
    for block in model.blocks.values():
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in block.router.parameters())
    model.eval()  # evaluation: the argmax of each task's logits, no noise
    for block in model.blocks.values():
        argmax = reference_logits(block.router, model.task_embeddings.weight.detach()).argmax(-1)
        assert torch.equal(block.router.task_mixture(0).argmax(-1), argmax)
        assert torch.all(block.router.task_mixture(0).max(-1).values == 1.0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_save_load_and_single_task_export_keep_the_outputs(arch, tmp_path):
    model = make_model(arch, router=ROUTER, shared=1)
    inputs = batch_inputs(model, batch=3)
    tasks = [0, 1, 2]
    with torch.no_grad():
        expected = model(**inputs, task_ids=tasks).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = MTAModel.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(loaded.task_embeddings.weight, model.task_embeddings.weight)
    assert not loaded.fresh_task_embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, task_ids=tasks).logits, expected, rtol=0, atol=1e-6)
    # the export freezes task 2's routes into a fixed router: no table, same outputs (export checks 1e-5)
    model.export_task(tmp_path / "summary", "summary", check_inputs=inputs, tolerance=1e-5)
    exported = MTAModel.from_pretrained(tmp_path / "summary")
    assert exported.task_embeddings is None and exported.router_config.kind == "fixed"


def test_a_new_task_gets_the_mean_row_and_the_mlps_keep_what_they_learned():
    model = make_model("llama", router=ROUTER, shared=1)
    before_table = model.task_embeddings.weight.detach().clone()
    before_mlps = {name: copy.deepcopy(block.router.mlp.state_dict()) for name, block in model.blocks.items()}
    new = model.add_task("qa", "generate")
    table = model.task_embeddings.weight
    assert new == 3 and table.shape == (4, 6)
    assert torch.equal(table[:3], before_table)
    torch.testing.assert_close(table[3], before_table.mean(0))
    assert all(block.router.source.task_table() is table for block in model.blocks.values())
    for name, block in model.blocks.items():
        state, old = block.router.mlp.state_dict(), before_mlps[name]
        assert torch.equal(state["0.weight"], old["0.weight"]) and torch.equal(state["0.bias"], old["0.bias"])
        # the output layer gains a unit for the new task's expert (test_model checks each unit follows its expert)
        assert state["2.weight"].shape[0] == old["2.weight"].shape[0] + 1
    inputs = batch_inputs(model, batch=3)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs, task_ids=[3, 0, 3]).logits).all()


def test_a_table_of_the_wrong_size_is_refused_by_name(tmp_path):
    model = make_model("llama", router=ROUTER)
    with pytest.raises(UsageError, match="task_embedding_dim is 4, but this model's task-embedding table has 6"):
        model.set_router(RouterConfig(kind="task_embedding", task_embedding_dim=4))
    state = model.mta_state_dict()
    state["task_embeddings.weight"] = torch.zeros(2, 6)
    with pytest.raises(UsageError, match="table of shape"):
        model.load_mta_state_dict(state)
    del state["task_embeddings.weight"]
    with pytest.raises(UsageError, match=r"lack task_embeddings\.weight"):
        model.load_mta_state_dict(state)


def test_group_learning_rates_are_the_stage_rates_and_share_the_schedule():
    from alter_ds.train import optimizer_and_schedule

    model = make_model("llama", router=ROUTER)
    stage = StageConfig(
        name="s",
        router=ROUTER,
        train=["task_experts", "router", "task_embeddings"],
        lr=1e-3,
        group_lr={"task_experts": 1e-5, "task_embeddings": 1e-2},
        steps=10,
    )
    model.apply_stage(stage)
    config = ExperimentConfig(run_name="x", model=ModelConfig(name_or_path="m"), tasks=list(TASKS), stages=[stage])
    config.training.warmup_steps = 0
    optimizer, schedule = optimizer_and_schedule(model, stage, config)
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for group, name, parameter in model.named_parameter_groups():
        if parameter.requires_grad:
            assert by_id[id(parameter)] == {"task_experts": 1e-5, "router": 1e-3, "task_embeddings": 1e-2}[group], name
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the stage's own rate first (the logged train/lr)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    rates = {g["lr"] / g["initial_lr"] for g in optimizer.param_groups}
    assert len(rates) == 1 and rates.pop() == pytest.approx(0.5)  # linear decay halfway, the same for each


def test_group_lr_names_a_parameter_group():
    with pytest.raises(ValueError, match=r"group_lr\.routers: is not a parameter group"):
        StageConfig(name="s", group_lr={"routers": 1e-3}).validate()


def _examples(task: int, rows: list[list[int]], prompt: int) -> list[TokenizedExample]:
    return [TokenizedExample(task, row, [-100] * prompt + row[prompt:], prompt) for row in rows]


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_inputs_init_is_each_tasks_mean_pooled_backbone_state(arch):
    """Reference: the untouched backbone on each example alone, pooled over its prompt (decoder-only) or
    its whole input (encoder), then averaged over the task's first ``count`` examples."""
    backbone = tiny_backbone(arch)
    reference = copy.deepcopy(backbone)
    config = RouterConfig(kind="task_embedding", embedding_init="inputs")
    model = MTAModel(backbone, MTAConfig(num_shared_experts=1), TASKS, config).eval()
    perturb_experts(model, 0.3)  # trained-looking experts: the vectors are still the backbone's
    generator = torch.Generator().manual_seed(0)
    lengths = {0: [6, 9, 7], 1: [5, 8, 8], 2: [10, 6, 7]}
    examples = [
        _examples(t, [torch.randint(3, 90, (n,), generator=generator).tolist() for n in lengths[t]], prompt=4)
        for t in range(3)
    ]
    seq2seq = model.is_encoder_decoder
    collator = MultiTaskCollator(0, seq2seq)
    table = init_from_inputs(model, examples, collator, count=2, batch_size=1 if seq2seq else 2)
    with torch.no_grad():
        for task in range(3):
            pooled = []
            for example in examples[task][:2]:
                ids = torch.tensor([example.input_ids])
                if seq2seq:
                    pooled.append(reference.get_encoder()(input_ids=ids).last_hidden_state[0].mean(0))
                else:
                    hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                    pooled.append(hidden[: example.prompt_length].mean(0))
            torch.testing.assert_close(table[task], torch.stack(pooled).mean(0), rtol=1e-5, atol=1e-5)
    assert not model.fresh_task_embeddings


def test_inputs_init_needs_the_backbones_width():
    model = make_model("llama", router=RouterConfig(kind="task_embedding", task_embedding_dim=3))
    examples = [_examples(t, [[5, 6, 7, 8]], prompt=2) for t in range(3)]
    with pytest.raises(UsageError, match=r"set router\.task_embedding_dim to 0 or"):
        init_from_inputs(model, examples, MultiTaskCollator(0, False), count=1)
