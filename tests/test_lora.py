"""LoRA experts: the update is the LoRA formula, a fresh model is the backbone, mixed batches equal each example
alone on T5, BART, GPT-2 and Llama (the other families are in test_architectures.py), only A and B train, and a
task folds exactly into a PEFT LoRA adapter that PEFT loads, or into merged weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TASKS, batch_inputs, perturb_experts
from tiny_models import tiny_backbone

from alter_ds.config import MTAConfig, RouterConfig
from alter_ds.errors import UsageError
from alter_ds.mta import MTAModel
from alter_ds.mta.inject import InjectionError
from alter_ds.mta.lora import LoRAWrapped

TOL = dict(rtol=1e-5, atol=1e-5)
#: every attention and FFN projection each architecture has (GPT-2 computes q, k and v in one ``c_attn``)
TARGETS = {
    "t5": ["q", "k", "v", "o", "up", "down"],
    "bart": ["q", "k", "v", "o", "up", "down"],
    "gpt2": ["c_attn", "o", "up", "down"],
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
}


def lora_model(arch, router=None, shared=1, rank=4, alpha=8.0, targets=None, seed=0):
    config = MTAConfig(
        expert_kind="lora", num_shared_experts=shared, bottleneck_dim=rank, lora_alpha=alpha,
        lora_targets=targets or TARGETS[arch],
    )  # fmt: skip
    return MTAModel(tiny_backbone(arch, seed), config, TASKS, router or RouterConfig(kind="task_weights")).eval()


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_lora_experts_run_on_the_core_architectures(arch, tmp_path):
    model = lora_model(arch)
    reference = tiny_backbone(arch, 0).eval()
    inputs = batch_inputs(model)
    task_ids = torch.tensor([2, 0, 1, 0])
    torch.testing.assert_close(model(**inputs, task_ids=task_ids).logits, reference(**inputs).logits, **TOL)

    perturb_experts(model, 0.3)
    batch = model(**inputs, task_ids=task_ids).logits
    assert (batch - reference(**inputs).logits).abs().max() > 1e-3
    for i in range(4):
        alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, task_ids=task_ids[i : i + 1]).logits
        torch.testing.assert_close(batch[i : i + 1], alone, **TOL)

    model.save_pretrained(tmp_path / "saved", save_backbone=True)
    loaded = MTAModel.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded(**inputs, task_ids=task_ids).logits, batch, **TOL)

    prompt = {k: v for k, v in inputs.items() if not k.startswith("decoder")}
    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    generated = model.generate(**prompt, task_ids=task_ids, **options)
    first = model.generate(**{k: v[1:2] for k, v in prompt.items()}, task_ids=task_ids[1:2], **options)
    torch.testing.assert_close(generated[1:2, : first.shape[1]], first)


ROUTERS = {
    "hard": RouterConfig(kind="hard"),
    "task_weights": RouterConfig(kind="task_weights", top_k=2),
    "gate": RouterConfig(kind="gate"),
    "token": RouterConfig(kind="token", task_embedding_dim=3),
    "task_embedding": RouterConfig(kind="task_embedding", task_embedding_dim=3),
    "uniform": RouterConfig(kind="uniform"),
    "fixed": RouterConfig(kind="fixed", routes={"sentiment": [1, 2], "topic": [0], "summary": [2]}),
    "random": RouterConfig(kind="random"),
}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_drives_lora_experts_and_each_task_exports(router, tmp_path):
    """Mixed batches equal each example alone; the alter-ds export equals the full model on its task for every
    router; routers with a fixed mixture per task also export to PEFT with the same logits."""
    model = lora_model("llama", router=ROUTERS[router])
    perturb_experts(model, 0.3)
    inputs = batch_inputs(model)
    task_ids = torch.tensor([2, 0, 1, 0])
    batch = model(**inputs, task_ids=task_ids).logits
    for i in range(4):
        alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, task_ids=task_ids[i : i + 1]).logits
        torch.testing.assert_close(batch[i : i + 1], alone, **TOL)
    expected = _logits(lambda **kw: model(**kw, task_ids=["topic"] * 4), inputs)
    model.export_task(tmp_path / "alter-ds", "topic")
    exported = MTAModel.from_pretrained(tmp_path / "alter-ds").eval()
    torch.testing.assert_close(_logits(lambda **kw: exported(**kw, task_ids=[0] * 4), inputs), expected, **TOL)
    if router in ("gate", "token"):
        with pytest.raises(UsageError, match="mixture depends on the input"):
            model.export_task(tmp_path / "peft", "topic", format="peft")
        return
    peft = pytest.importorskip("peft")
    model.export_task(tmp_path / "peft", "topic", format="peft")
    served = peft.PeftModel.from_pretrained(tiny_backbone("llama", 0), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(served, inputs), expected, **TOL)


def test_the_update_is_alpha_over_r_times_the_mixture_of_b_a():
    model = lora_model("llama", rank=3, alpha=6.0, targets=["v"])
    perturb_experts(model, 0.3)
    block = model.blocks["decoder.0.v"]
    wrapper = model.backbone.model.layers[0].self_attn.v_proj
    assert isinstance(wrapper, LoRAWrapped) and block.task_experts.out_width != block.task_experts.width
    seen = {}
    wrapper.register_forward_hook(lambda module, args, out: seen.update(x=args[0], y=out))
    task_ids = torch.tensor([1, 2, 0, 1])
    model(**batch_inputs(model), task_ids=task_ids)
    x, y = seen["x"], seen["y"]
    mixture = block.router.task_mixture()[task_ids]  # [B, E]: 3 task experts, then the shared one
    a = torch.cat([block.task_experts.w_down, block.shared_experts.w_down])  # [E, in, r]
    b = torch.cat([block.task_experts.w_up, block.shared_experts.w_up])  # [E, r, out]
    update = torch.einsum("bti,eir,ero,be->bto", x, a, b, mixture)
    expected = wrapper.base_layer(x) + (6.0 / 3) * update
    torch.testing.assert_close(y, expected, **TOL)


def test_b_starts_at_zero_and_only_the_lora_tensors_train():
    model = lora_model("llama").train()
    model.set_trainable(["task_experts", "shared_experts"])
    loss = model(**batch_inputs(model), task_ids=[0, 1, 2, 0]).logits.square().mean()
    loss.backward()
    for block in model.blocks.values():
        for bank in (block.task_experts, block.shared_experts):
            assert bank.b_down is None and bank.b_up is None and not bool(bank.w_up.detach().any())
            assert bank.w_up.grad is not None and bool(bank.w_up.grad.any())  # B learns first
            assert bank.w_down.grad is not None and not bool(bank.w_down.grad.any())  # A waits for B
    frozen = [n for n, p in model.backbone.named_parameters() if ".mta." not in n]
    assert frozen and all(model.backbone.get_parameter(n).grad is None for n in frozen)


def test_targets_that_do_not_exist_are_refused_naming_what_was_found():
    with pytest.raises(InjectionError, match=r"'q'.*GPT2Attention.*\['c_attn', 'c_proj'\].*target 'c_attn'"):
        lora_model("gpt2", targets=["q"])
    with pytest.raises(InjectionError, match=r"no projection named 'qkv'.*linear children found: \[.*'q_proj'"):
        lora_model("llama", targets=["qkv"])
    with pytest.raises(InjectionError, match="'up' and 'up_proj' name the same projection"):
        lora_model("llama", targets=["up", "up_proj"])


# ------------------------------------------------------------------------------------------ export
def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "arch, router",
    [
        ("llama", RouterConfig(kind="task_weights")),
        ("llama", RouterConfig(kind="hard")),
        ("gpt2", RouterConfig(kind="task_weights", top_k=2)),  # Conv1D projections: PEFT's fan_in_fan_out
        ("t5", RouterConfig(kind="task_weights")),
    ],
    ids=["llama-task-weights", "llama-hard", "gpt2-top2", "t5"],
)
def test_peft_loads_each_exported_task_with_the_full_models_logits(arch, router, tmp_path):
    peft = pytest.importorskip("peft")
    model = lora_model(arch, router=router)
    perturb_experts(model, 0.3)
    if router.kind == "task_weights" and not router.top_k:  # one projection where task 1 keeps one expert
        with torch.no_grad():
            next(iter(model.blocks.values())).router.task_logits[1, 1:] = float("-inf")
    inputs = batch_inputs(model)
    for task in range(len(TASKS)):
        out = tmp_path / f"task{task}"
        model.export_task(out, task, format="peft")
        config = json.loads((out / "adapter_config.json").read_text())
        loaded = peft.PeftModel.from_pretrained(tiny_backbone(arch, 0), str(out)).eval()
        expected = _logits(lambda **kw: model(**kw, task_ids=[task] * 4), inputs)  # noqa: B023
        torch.testing.assert_close(_logits(loaded, inputs), expected, **TOL)
        if router.kind == "task_weights" and not router.top_k and task == 1:
            assert list(config["rank_pattern"].values()) == [4]  # one expert of rank 4, the others 4 x 4
        if router.kind == "hard":
            assert config["r"] == 8 and not config["rank_pattern"]  # the task's expert and the shared one
    assert config["fan_in_fan_out"] == (arch == "gpt2")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_export_is_a_plain_model_with_the_tasks_logits(arch, tmp_path):
    model = lora_model(arch)
    perturb_experts(model, 0.3)
    inputs = batch_inputs(model)
    model.export_task(tmp_path / "merged", "topic", format="merged")
    assert not (tmp_path / "merged" / "mta_config.json").exists()
    plain = type(tiny_backbone(arch, 0)).from_pretrained(str(tmp_path / "merged")).eval()
    expected = _logits(lambda **kw: model(**kw, task_ids=["topic"] * 4), inputs)
    torch.testing.assert_close(_logits(plain, inputs), expected, **TOL)


def test_experts_that_are_not_low_rank_updates_say_how_to_export_instead(tmp_path):
    bottleneck = MTAModel(tiny_backbone("llama", 0), MTAConfig(num_shared_experts=1), TASKS, RouterConfig())
    for format in ("peft", "merged"):
        with pytest.raises(UsageError, match=r"'bottleneck'.*only lora experts.*--format alter-ds"):
            bottleneck.export_task(tmp_path / format, 0, format=format)
    gated = lora_model("llama", router=RouterConfig(kind="gate"))
    with pytest.raises(UsageError, match="'gate' router, whose mixture depends on the input"):
        gated.export_task(tmp_path / "gate", 0, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


# ------------------------------------------------------------------------------------------ the command
@pytest.mark.slow
def test_a_lora_run_exports_each_task_for_peft_and_merged_through_the_cli(tmp_path, capsys):
    """Both stages of a LoRA-expert run through the DeepSpeed launcher (2 ranks), then ``alter-ds export``:
    PEFT loads the adapter onto the run's own backbone directory, and the merged model loads with plain
    transformers; both give the trained model's logits on that task."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("deepspeed")
    import transformers
    import yaml
    from tiny_experiment import write_tiny_experiment
    from training_runs import finish, launch

    from alter_ds.cli import main

    path = write_tiny_experiment(tmp_path, stage1_steps=6, stage2_steps=4)
    config = yaml.safe_load(path.read_text())
    config["mta"] = {"expert_kind": "lora", "lora_targets": ["q", "v", "down"], "bottleneck_dim": 4,
                     "num_shared_experts": 1}  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = finish(launch(tmp_path, tmp_path / "runs"))
    assert code == 0, out[-4000:]
    run = tmp_path / "runs" / "tiny"
    trained = MTAModel.from_pretrained(run / "stage2" / "model").eval()
    task = trained.task_names[1]
    inputs = batch_inputs(trained)
    expected = _logits(lambda **kw: trained(**kw, task_ids=[task] * 4), inputs)

    assert main(["export", str(run), "--task", task, "--format", "peft"]) == 0
    adapter = run / "export" / f"{task}_peft"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "tiny-llama"
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny-llama"))
    served = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    torch.testing.assert_close(_logits(served, inputs), expected, **TOL)

    assert main(["export", str(run), "--task", task, "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(_logits(merged, inputs), expected, **TOL)
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m")).pad_token_id is not None

    capsys.readouterr()
    assert main(["export", str(run), "--task", "nope", "--format", "peft"]) == 2
    assert f"--task nope: the run's tasks are {', '.join(trained.task_names)}" in capsys.readouterr().err
