"""Multi-task sampling: proportions (statistical), epochs, caps, determinism, resume, rank sharding."""

from __future__ import annotations

import math

import pytest

from alter_ds.data.sampler import BLOCK, MultiTaskSampler, task_probabilities

SIZES = [1000, 300, 50, 10]


def draw(sampler, batches):
    return [sampler.next_global_batch() for _ in range(batches)]


@pytest.mark.parametrize(
    "strategy, temperature", [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0), ("uniform", 1.0)]
)
def test_task_frequencies_match_the_strategy(strategy, temperature):
    """Each task's share over 20,000 draws lies within 4 standard deviations of its probability
    (a false alarm has probability < 1e-4 per task)."""
    sampler = MultiTaskSampler(SIZES, global_batch_size=100, strategy=strategy, temperature=temperature, seed=3)
    counts = [0] * len(SIZES)
    for batch in draw(sampler, 200):
        for task, _ in batch:
            counts[task] += 1
    n = sum(counts)
    for task, p in enumerate(sampler.probabilities):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[task] / n - p) < 4 * sigma, (task, counts[task] / n, p)


def test_probability_formulas():
    assert task_probabilities([1, 3], "proportional") == [0.25, 0.75]
    assert task_probabilities([1, 4], "temperature", 2.0) == pytest.approx([1 / 3, 2 / 3])
    assert task_probabilities([7, 1], "uniform") == [0.5, 0.5]
    with pytest.raises(ValueError, match="at least one example"):
        task_probabilities([3, 0], "uniform")
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        task_probabilities([3], "zipf")


def test_each_task_epoch_visits_every_example_once():
    sampler = MultiTaskSampler([7, 5], global_batch_size=4, strategy="uniform", seed=1)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in draw(sampler, 30):
        for task, index in batch:
            seen[task].append(index)
    for task, size in enumerate([7, 5]):
        epochs = len(seen[task]) // size
        assert epochs >= 2
        for e in range(epochs):
            assert sorted(seen[task][e * size : (e + 1) * size]) == list(range(size))
        assert seen[task][:size] != seen[task][size : 2 * size]  # reshuffled per epoch


def test_per_task_cap_limits_pool_and_share():
    sampler = MultiTaskSampler([1000, 10], global_batch_size=50, max_per_task=100, seed=0)
    assert sampler.probabilities == pytest.approx([100 / 110, 10 / 110])
    used = {index for batch in draw(sampler, 40) for task, index in batch if task == 0}
    assert len(used) == 100 and max(used) < 1000


def test_deterministic_and_seed_dependent():
    a = draw(MultiTaskSampler(SIZES, 16, seed=5), 20)
    b = draw(MultiTaskSampler(SIZES, 16, seed=5), 20)
    c = draw(MultiTaskSampler(SIZES, 16, seed=6), 20)
    assert a == b and a != c


@pytest.mark.parametrize("mixed", [True, False])
def test_resume_replays_exactly_the_uninterrupted_stream(mixed):
    batches = BLOCK // 16 + 40  # crosses a block of task draws
    full = draw(MultiTaskSampler(SIZES, 16, seed=2, mixed_batches=mixed), batches)
    first = MultiTaskSampler(SIZES, 16, seed=2, mixed_batches=mixed)
    head = draw(first, 100)
    state = first.state_dict()
    resumed = MultiTaskSampler(SIZES, 16, seed=2, mixed_batches=mixed)
    resumed.load_state_dict(state)
    assert head + draw(resumed, batches - 100) == full


def test_single_task_batches():
    for batch in draw(MultiTaskSampler(SIZES, 8, mixed_batches=False), 30):
        assert len({task for task, _ in batch}) == 1


def test_rank_shards_are_disjoint_and_complete_for_any_world_size():
    for world in (1, 2, 4):
        sampler = MultiTaskSampler(SIZES, 8, seed=9)
        for batch in draw(sampler, 10):
            shards = [MultiTaskSampler.shard(batch, rank, world) for rank in range(world)]
            assert [pair for shard in shards for pair in shard] == batch
            assert all(len(s) == 8 // world for s in shards)
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        MultiTaskSampler.shard([(0, 0)] * 8, 0, 3)


def test_state_from_another_run_is_refused():
    state = MultiTaskSampler(SIZES, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="another run: seed"):
        MultiTaskSampler(SIZES, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another run: sizes"):
        MultiTaskSampler([5, 5], 8, seed=1).load_state_dict(state)
