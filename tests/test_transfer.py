"""Transfer to an unseen task: placed by its inputs among the known tasks, routed zero-shot like the nearest
one, and few-shot training that changes only the new task's own parameters (every other tensor bit-identical)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TASKS, make_model
from tiny_models import VOCAB

from alter_ds.config import RouterConfig
from alter_ds.data.collate import MultiTaskCollator, TokenizedExample
from alter_ds.errors import UsageError
from alter_ds.transfer import add_unseen_task, few_shot, task_vector

COLLATE = MultiTaskCollator(0, False)


def examples(low: int, high: int, count: int = 6, seed: int = 0) -> list[TokenizedExample]:
    """Examples whose tokens come from [low, high): tasks drawing from one range look alike."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(low, high, (int(n),), generator=generator).tolist() for n in torch.randint(5, 9, (count,))]
    return [TokenizedExample(0, row, [-100] * 3 + row[3:], 3) for row in rows]


# the three known tasks draw from three token ranges; the unseen one from the second task's range
KNOWN = [examples(3, 20, seed=1), examples(40, 60, seed=2), examples(70, VOCAB, seed=3)]


def placed(router, init="nearest", own_expert=False):
    model = make_model("llama", router=router, shared=1)
    known = torch.stack([task_vector(model, task, COLLATE) for task in KNOWN])
    new = examples(40, 60, seed=9)
    placement = add_unseen_task(model, "unseen", "classify", task_vector(model, new, COLLATE), known, init, own_expert)
    return model, placement, new


ROUTERS = [
    RouterConfig(kind="task_weights", temperature=0.5),
    RouterConfig(kind="task_embedding", task_embedding_dim=6),
    RouterConfig(kind="token", task_embedding_dim=4),
]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: r.kind)
def test_zero_shot_routes_like_the_nearest_task(router):
    model, placement, new = placed(router)
    assert placement.nearest == TASKS[1].name and placement.task_id == 3
    assert max(placement.similarities, key=placement.similarities.get) == TASKS[1].name
    batch = COLLATE(new)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        unseen = model(**inputs, task_ids=[3] * len(new)).logits
        nearest = model(**inputs, task_ids=[1] * len(new)).logits
    torch.testing.assert_close(unseen, nearest, rtol=0, atol=0)  # the same routes and experts, exactly


def test_uniform_and_inputs_starts():
    model, placement, _ = placed(RouterConfig(kind="task_weights"), init="uniform")
    for block in model.blocks.values():
        assert torch.all(block.router.task_logits[placement.task_id] == 0)
    width_router = RouterConfig(kind="task_embedding")  # table as wide as the backbone: input vectors fit
    model, placement, new = placed(width_router, init="inputs")
    vector = task_vector(model, new, COLLATE)
    torch.testing.assert_close(model.task_embeddings.weight[placement.task_id].detach(), vector)
    with pytest.raises(UsageError, match="table is 6 wide"):
        placed(RouterConfig(kind="task_embedding", task_embedding_dim=6), init="inputs")


@pytest.mark.parametrize("router", ROUTERS[:2], ids=lambda r: r.kind)
@pytest.mark.parametrize("own_expert", [False, True])
def test_few_shot_trains_only_the_new_tasks_parameters(router, own_expert):
    model, placement, new = placed(router, own_expert=own_expert)
    task = placement.task_id
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    batches = [COLLATE(new[:3]), COLLATE(new[3:])]
    losses = few_shot(model, task, batches, steps=8, lr=5e-2, own_expert=own_expert)
    assert losses[-1] < losses[0]  # it learns something
    changed = []
    for name, tensor in model.state_dict().items():
        if torch.equal(tensor, before[name]):
            continue
        changed.append(name)
        difference = (tensor != before[name]).nonzero()
        if name.endswith(("task_logits", "task_embeddings.weight")):
            assert set(difference[:, 0].tolist()) == {task}, name  # only the new task's row
        else:  # the new expert's slices of the task bank
            assert own_expert and ".task_experts." in name, name
            assert set(difference[:, 0].tolist()) <= {model.layout.task_experts[task][0]}, name
    assert changed, "few-shot training changed nothing"
    if own_expert:
        assert any(".task_experts." in name for name in changed)


def test_hard_routes_have_nothing_of_their_own_to_train():
    model, placement, new = placed(RouterConfig(kind="hard"))
    with pytest.raises(UsageError, match="no per-task parameters"):
        few_shot(model, placement.task_id, [COLLATE(new)], steps=1, lr=1e-2)
    assert model.layout.task_experts[placement.task_id] == model.layout.task_experts[1]  # shares the nearest's


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A run whose two stages 'finished' (their models saved), without training: what transfer reads."""
    import yaml
    from tiny_experiment import task_specs, write_tiny_experiment

    from alter_ds.config import load_config, save_config
    from alter_ds.mta import build_model
    from alter_ds.run import RunLayout

    monkeypatch.chdir(tmp_path)
    config = load_config(write_tiny_experiment(tmp_path, stage1_steps=1))
    layout = RunLayout.of(config, tmp_path / "runs" / "tiny")
    model = build_model(config)
    for index, stage in enumerate(config.stages):
        model.apply_stage(stage)
        model.save_pretrained(layout.model_dir(index))
        layout.summary_file(index).write_text("{}")
    save_config(config, layout.config_file)
    unseen = task_specs(["arithmetic"])[:2]  # add, subtract: a family the run never saw
    (tmp_path / "unseen.yaml").write_text(yaml.safe_dump({"tasks": unseen}))
    return layout.root


def test_transfer_command_scores_unseen_tasks_against_a_baseline(finished_run, capsys):
    from alter_ds.cli import main

    arguments = ["transfer", str(finished_run), "--task", "unseen.yaml", "--shots", "4", "--steps", "3"]
    assert main([*arguments, "--max-examples", "4", "--baseline", str(finished_run)]) == 0
    printed = capsys.readouterr().out
    assert "4-shot" in printed and "nearest known task" in printed
    for task in ("add", "subtract"):
        saved = json.loads((finished_run / "transfer" / f"{task}_4-shot.json").read_text())
        assert saved["examples"] == 4 and saved["baseline_score"] is not None and len(saved["losses"]) == 3
        assert saved["nearest"] in saved["similarities"] and len(saved["similarities"]) == 7
    assert main([*arguments[:4], "--zero-shot", "--max-examples", "2"]) == 0
    assert json.loads((finished_run / "transfer" / "add_zero-shot.json").read_text())["losses"] == []


def test_transfer_refuses_known_tasks_and_missing_files(finished_run, tmp_path, capsys):
    import yaml
    from tiny_experiment import task_specs

    from alter_ds.cli import main

    (tmp_path / "known.yaml").write_text(yaml.safe_dump({"tasks": task_specs(["string"])[:1]}))
    assert main(["transfer", str(finished_run), "--task", "known.yaml"]) == 2
    assert "['reverse'] are tasks the run trained on" in capsys.readouterr().err
    assert main(["transfer", str(finished_run), "--task", "nope.yaml"]) == 2
    assert "no task file at nope.yaml" in capsys.readouterr().err


def test_inputs_init_without_a_table_is_refused_before_the_model_changes():
    model = make_model("llama", router=RouterConfig(kind="task_weights"), shared=1)
    known = torch.stack([task_vector(model, task, COLLATE) for task in KNOWN])
    vector = task_vector(model, examples(40, 60, seed=9), COLLATE)
    with pytest.raises(UsageError, match="init: inputs needs a task_embedding router"):
        add_unseen_task(model, "unseen", "classify", vector, known, "inputs")
    assert model.task_names == [t.name for t in TASKS] and model.layout.num_tasks == 3
