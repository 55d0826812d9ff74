"""generate with task ids: cached greedy equals step-by-step full forwards; mixed-task beam search equals
per-example beam search. The gate router (prompt-pooled features reused under the KV cache) is the hard case."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, make_model, slice_inputs

from alter_ds.config import RouterConfig

ROUTERS = {
    "hard": RouterConfig(kind="hard"),
    "gate": RouterConfig(kind="gate"),
    "token": RouterConfig(kind="token", task_embedding_dim=4),
    "task_weights": RouterConfig(kind="task_weights", top_k=2),
}
NEW_TOKENS = 5


def next_token(model, logits):
    """argmax with EOS suppressed, as generate does under min_new_tokens."""
    logits = logits[:, -1].clone()
    logits[:, model.backbone.generation_config.eos_token_id] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def greedy_by_full_forwards(model, inputs, task_ids):
    """Greedy decoding that recomputes the whole sequence every step (no cache)."""
    if model.is_encoder_decoder:
        start = model.backbone.generation_config.decoder_start_token_id
        decoder = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long)
        for _ in range(NEW_TOKENS):
            logits = model(**inputs, decoder_input_ids=decoder, task_ids=task_ids, use_cache=False).logits
            decoder = torch.cat([decoder, next_token(model, logits)], dim=1)
        return decoder
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_mask = mask.clone()
    for _ in range(NEW_TOKENS):
        logits = model(
            input_ids=ids, attention_mask=mask, prompt_mask=prompt_mask, task_ids=task_ids, use_cache=False
        ).logits
        ids = torch.cat([ids, next_token(model, logits)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        prompt_mask = torch.cat([prompt_mask, torch.zeros_like(prompt_mask[:, :1])], dim=1)
    return ids


def prompt_inputs(model):
    inputs = batch_inputs(model)
    inputs.pop("decoder_input_ids", None)
    return inputs


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_cached_greedy_equals_step_by_step_full_forward(arch, router):
    model = make_model(arch, "bottleneck", ROUTERS[router], shared=1, perturb=0.5)
    inputs = prompt_inputs(model)
    task_ids = torch.tensor([2, 0, 1, 0])
    cached = model.generate(
        **inputs, task_ids=task_ids, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, min_new_tokens=NEW_TOKENS
    )
    expected = greedy_by_full_forwards(model, inputs, task_ids)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("router", ["hard", "gate", "token"])
def test_mixed_task_beam_search_equals_per_example_beams(arch, router):
    model = make_model(arch, "bottleneck", ROUTERS[router], shared=1, perturb=0.5)
    inputs = prompt_inputs(model)
    task_ids = [2, 0, 1, "topic"]
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
    batched = model.generate(**inputs, task_ids=task_ids, **options)
    for i in range(4):
        alone = model.generate(**slice_inputs(inputs, i), task_ids=[task_ids[i]], **options)
        assert torch.equal(batched[i : i + 1, : alone.shape[1]], alone), f"example {i}"


def test_generate_routes_by_task():
    model = make_model("llama", "bottleneck", ROUTERS["hard"], perturb=2.0)
    inputs = prompt_inputs(model)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    outputs = {t: model.generate(**inputs, task_ids=[t] * 4, **options) for t in range(3)}
    assert not (torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2]))
