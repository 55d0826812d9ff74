"""Accepted means it runs: every decoder-only family of the matrix, built tiny from its config, goes through
injection, forward (identity at init, a mixed batch equal to each example alone), save/load and generate, for
each placement: bottleneck experts after the FFN and after self-attention, FFN copies replacing the FFN, layer
copies replacing the layer, and LoRA experts beside the attention and FFN projections.
T5, BART, GPT-2 and Llama are covered the same way in test_inject.py, test_model.py and test_generation.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TASKS, perturb_experts
from tiny_models import PAD, VOCAB

from alter_ds.config import MTAConfig, RouterConfig
from alter_ds.mta import MTAModel

TOL = dict(rtol=1e-5, atol=1e-5)
COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=2, eos_token_id=1, max_position_embeddings=64)


def _families():
    import transformers as hf

    return {
        "opt": lambda: hf.OPTForCausalLM(
            hf.OPTConfig(
                hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=24, word_embed_proj_dim=16,
                dropout=0.0, attention_dropout=0.0, **COMMON,
            )
        ),
        "phi": lambda: hf.PhiForCausalLM(
            hf.PhiConfig(
                hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **COMMON,
            )
        ),
        "phi3": lambda: hf.Phi3ForCausalLM(
            hf.Phi3Config(
                hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **COMMON,
            )
        ),
        "qwen2": lambda: hf.Qwen2ForCausalLM(
            hf.Qwen2Config(
                hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **COMMON,
            )
        ),
        "gpt_neox": lambda: hf.GPTNeoXForCausalLM(
            hf.GPTNeoXConfig(
                hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                hidden_dropout=0.0, attention_dropout=0.0, **COMMON,
            )
        ),
        "gemma": lambda: hf.GemmaForCausalLM(
            hf.GemmaConfig(
                hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=4, **COMMON,
            )
        ),
        "mistral": lambda: hf.MistralForCausalLM(
            hf.MistralConfig(
                hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=None, **COMMON,
            )
        ),
    }  # fmt: skip


FAMILIES = sorted(_families())
LORA_DEFAULT = ["q", "k", "v", "o", "up", "down"]
#: families whose attention computes q, k and v in one projection
LORA_TARGETS = {"gpt_neox": ["query_key_value", "o", "up", "down"], "phi3": ["qkv_proj", "o", "up", "down"]}


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _families()[family]()
    model.generation_config.pad_token_id = PAD
    return model.eval()


def inputs_of(batch: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2] = PAD  # left padding on one row, as generation pads
    attention_mask[0, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize(
    "kind, position",
    [
        ("bottleneck", "after_ffn"),
        ("bottleneck", "after_attention"),
        ("ffn", "replace_ffn"),
        ("layer", "replace_layer"),
        ("lora", "projections"),
    ],
)
def test_every_family_runs_forward_save_load_and_generate(family, kind, position, tmp_path):
    backbone = tiny(family)
    reference = copy.deepcopy(backbone)
    if kind == "layer":  # three copies of each layer, no shared experts
        mta = MTAConfig(expert_kind=kind, num_task_experts=3)
    elif kind == "lora":  # attention and FFN projections, fused ones by their own names
        mta = MTAConfig(expert_kind=kind, num_shared_experts=1, lora_targets=LORA_TARGETS.get(family, LORA_DEFAULT))
    else:
        mta = MTAConfig(expert_kind=kind, num_shared_experts=1, shared_init="pretrained" if kind == "ffn" else "zeros")
    mta.position = position
    router = RouterConfig(kind="task_weights", temperature=0.1) if kind == "ffn" else RouterConfig(kind="hard")
    model = MTAModel(backbone, mta, TASKS, router).eval()
    inputs = inputs_of()
    task_ids = torch.tensor([2, 0, 1, 0])
    torch.testing.assert_close(model(**inputs, task_ids=task_ids).logits, reference(**inputs).logits, **TOL)

    perturb_experts(model, 0.3)
    batch = model(**inputs, task_ids=task_ids).logits
    for i in range(4):
        alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, task_ids=task_ids[i : i + 1]).logits
        torch.testing.assert_close(batch[i : i + 1], alone, **TOL)
    assert not torch.allclose(model(**inputs, task_ids=torch.tensor([1, 2, 0, 1])).logits, batch)

    model.save_pretrained(tmp_path / "saved", save_backbone=True)
    loaded = MTAModel.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded(**inputs, task_ids=task_ids).logits, batch, **TOL)

    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    generated = model.generate(**inputs, task_ids=task_ids, **options)
    assert generated.shape == (4, inputs["input_ids"].shape[1] + 4)
    first = model.generate(**{k: v[1:2] for k, v in inputs.items()}, task_ids=task_ids[1:2], **options)
    torch.testing.assert_close(generated[1:2], first)


def test_a_gate_router_pools_each_example_even_where_the_ffn_sees_flattened_tokens():
    """OPT flattens [B, T, d] to [B*T, d] around its FFN: the block routes the rows back to their examples, so
    a gate pools each example's prompt and a mixed batch still equals each example alone."""
    model = MTAModel(tiny("opt"), MTAConfig(num_shared_experts=1), TASKS, RouterConfig(kind="gate")).eval()
    perturb_experts(model, 0.3)
    inputs = inputs_of()
    task_ids = torch.tensor([2, 0, 1, 0])
    batch = model(**inputs, task_ids=task_ids).logits
    for i in range(4):
        alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, task_ids=task_ids[i : i + 1]).logits
        torch.testing.assert_close(batch[i : i + 1], alone, **TOL)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2", "llama"])
def test_training_loss_from_the_target_positions_equals_the_full_logits(family, monkeypatch):
    """The trainer projects onto the vocabulary only the positions that predict a target (``logits_to_keep``):
    on a right-padded mixed batch whose targets start and end at different places, the loss, the per-task
    sums and every gradient equal those of the full logits, and the projection really saw fewer positions."""
    from tiny_models import tiny_backbone

    from alter_ds.data.collate import IGNORE_INDEX, MultiTaskCollator, TokenizedExample
    from alter_ds.train import micro_batch_loss

    backbone = tiny_backbone(family) if family in ("gpt2", "llama") else tiny(family)
    model = MTAModel(backbone, MTAConfig(num_shared_experts=1), TASKS, RouterConfig(kind="hard"))
    perturb_experts(model, 0.3)
    model.train()
    assert model.backbone_accepts("logits_to_keep")
    rows = [(9, 2), (4, 1), (6, 4), (3, 0)]  # (prompt tokens, target tokens): the last row has no target
    generator = torch.Generator().manual_seed(1)
    examples = []
    for task, (prompt, target) in enumerate(rows):
        ids = torch.randint(3, VOCAB, (prompt + target,), generator=generator).tolist()
        examples.append(TokenizedExample(task % 3, ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    batch = MultiTaskCollator(PAD, seq2seq=False)(examples)
    projected: list[int] = []
    hook = model.backbone.get_output_embeddings().register_forward_hook(
        lambda module, args, output: projected.append(args[0].shape[1])
    )

    def loss_and_gradients():
        model.zero_grad()
        loss, sums = micro_batch_loss(model, model, dict(batch), num_tasks=3, seq2seq=False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), sums, grads

    kept_loss, kept_sums, kept_grads = loss_and_gradients()
    with monkeypatch.context() as patch:  # a backbone without logits_to_keep: the full logits
        patch.setattr(model, "backbone_accepts", lambda argument: argument != "logits_to_keep")
        full_loss, full_sums, full_grads = loss_and_gradients()
    hook.remove()
    length = batch["input_ids"].shape[1]
    targets_at = {p + t - 1 for p, n in rows for t in range(n)}  # logits that predict the targets
    assert projected == [len(targets_at), length] and len(targets_at) < length - 1
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kept_sums, full_sums, rtol=1e-6, atol=1e-6)
    assert kept_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
