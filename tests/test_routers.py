"""Routers: the one interface, Gumbel variants, temperature schedule, priors, usage and entropy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_inputs, make_model

from alter_ds.config import RouterConfig
from alter_ds.mta.routers import (
    ExpertLayout,
    GateRouter,
    build_router,
    mixture_entropy,
    prior_logits,
    temperature_at,
)

LAYOUT = ExpertLayout(num_tasks=3, num_task_experts=3, num_shared_experts=1)
NAMES = ["a", "b", "c"]


def route(kind, training=False, batch=6, length=4, **options):
    router = build_router(RouterConfig(kind=kind, **options), LAYOUT, 8, NAMES)
    router.train(training)
    hidden = torch.randn(batch, length, 8)
    task_ids = torch.arange(batch) % 3
    features = hidden.mean(1) if router.needs_features else None
    return router, router(hidden, task_ids, features, 0), task_ids


@pytest.mark.parametrize("kind", ["hard", "task_weights", "gate", "token", "uniform", "random"])
def test_every_router_returns_ids_and_weights_of_one_shape(kind):
    router, (ids, weights), _ = route(kind)
    assert ids.dtype == torch.int64 and ids.shape == weights.shape
    assert ids.dim() == (2 if router.example_level else 3)
    assert int(ids.min()) >= 0 and int(ids.max()) < LAYOUT.num_experts
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_hard_router_uses_the_task_expert_and_shared_experts():
    _, (ids, weights), task_ids = route("hard")
    for row, task in enumerate(task_ids.tolist()):
        assert sorted(ids[row].tolist()) == [task, 3]
        assert weights[row].tolist() == [0.5, 0.5]


def test_straight_through_gumbel_is_one_hot_forward_with_gradients_backward():
    torch.manual_seed(0)
    router, (ids, weights), _ = route("task_weights", training=True, mode="st_gumbel", temperature=2.0)
    assert ids.shape[-1] == 1 and torch.all(weights == 1.0)
    (weights * torch.arange(1.0, 7.0)[:, None]).sum().backward()
    assert router.task_logits.grad is not None
    assert torch.count_nonzero(router.task_logits.grad) > 0
    router.eval()  # evaluation: argmax of the logits, no noise
    ids_eval, _ = router(torch.randn(6, 4, 8), torch.arange(6) % 3, None, 0)
    assert torch.equal(ids_eval.squeeze(-1), router.task_logits.argmax(-1)[torch.arange(6) % 3])


def test_gumbel_softmax_is_random_in_training_and_deterministic_in_eval():
    router = build_router(RouterConfig(kind="task_weights", mode="gumbel"), LAYOUT, 8, NAMES)
    hidden, task_ids = torch.randn(4, 2, 8), torch.zeros(4, dtype=torch.long)
    router.train()
    _, noisy = router(hidden, task_ids, None, 0)
    assert not torch.allclose(noisy[0], noisy[1])
    router.eval()
    _, clean = router(hidden, task_ids, None, 0)
    torch.testing.assert_close(clean[0], clean[1])


def test_temperature_schedule():
    config = RouterConfig(temperature=2.0, temperature_decay=3e-4, min_temperature=0.1)
    assert temperature_at(config, 0) == 2.0
    assert temperature_at(config, 1000) == pytest.approx(2.0 * math.exp(-0.3))
    assert temperature_at(config, 100_000) == 0.1
    router = build_router(RouterConfig(kind="task_weights", temperature=2.0, temperature_decay=1e-2), LAYOUT, 8, NAMES)
    early, late = router.task_mixture(0), router.task_mixture(500)
    assert (mixture_entropy(late) < mixture_entropy(early)).all()  # cooling sharpens the mixture


def test_prior_biased_init_follows_the_official_selector():
    config = RouterConfig(kind="task_weights", temperature=0.1)
    layout = ExpertLayout(3, 5, 0, [[0, 1], [2, 3], [4]])  # 5 experts for 3 tasks, as in the official code
    logits = prior_logits(config, layout, 5)
    assert logits[0].tolist() == pytest.approx([0.22, 0.22, 0.2, 0.2, 0.2])
    mixture = torch.softmax(logits / 0.1, -1)
    assert mixture[2].argmax() == 4 and mixture[2, 4] == pytest.approx(math.e**0.2 / (math.e**0.2 + 4))


def test_top_k_keeps_k_experts_renormalised():
    _, (ids, weights), _ = route("task_weights", top_k=2)
    assert ids.shape[-1] == 2
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))


def test_gate_needs_a_shared_expert():
    with pytest.raises(ValueError, match="add at least one shared expert"):
        GateRouter(RouterConfig(kind="gate"), ExpertLayout(3, 3, 0), 8)


def test_fixed_routes_name_known_tasks_and_experts():
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        build_router(RouterConfig(kind="fixed", routes={"zz": [0]}), LAYOUT, 8, NAMES)
    with pytest.raises(ValueError, match="names expert 9"):
        build_router(RouterConfig(kind="fixed", routes={"a": [9]}), LAYOUT, 8, NAMES)


def test_blocks_record_usage_per_task_and_entropy():
    model = make_model("gpt2", router=RouterConfig(kind="hard"))
    model(**batch_inputs(model), task_ids=[0, 0, 2, 2])
    usage = next(iter(model.blocks.values())).usage()
    assert usage[0].tolist() == [1.0, 0.0, 0.0] and usage[2].tolist() == [0.0, 0.0, 1.0]
    assert usage[1].tolist() == [0.0, 0.0, 0.0]  # task 1 absent
    assert mixture_entropy(usage[[0, 2]]).abs().max() < 1e-6
    assert mixture_entropy(torch.full((1, 4), 0.25)).item() == pytest.approx(math.log(4))
    mixtures = model.task_mixtures()
    assert all(m is not None and m.shape == (3, 3) for m in mixtures.values())
