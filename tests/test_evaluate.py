"""Evaluation: mixed-task batches give each example the prediction it gets alone; metrics per task."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import perturb_experts
from tiny_models import tiny_backbone, tiny_tokenizer

from alter_ds.config import MTAConfig, RouterConfig
from alter_ds.data.synthetic import synthetic_tasks
from alter_ds.data.tasks import load_split
from alter_ds.evaluate import (
    _generate,
    _score_labels,
    evaluate,
    format_results,
    label_scores_per_pair,
    label_scores_shared_prompt,
)
from alter_ds.mta import MTAModel

TOKENIZER = tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "t5"])
def setup(request):
    tasks = synthetic_tasks(["string", "rule"])
    model = MTAModel(tiny_backbone(request.param), MTAConfig(), tasks).eval()
    # random tiny models tend to emit pad/eos at once: suppress the special tokens so outputs carry text
    model.backbone.generation_config.suppress_tokens = [0, 1, 2, 3]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks.values():
            block.task_experts.w_up.normal_(0, 0.5, generator=generator)
    examples = {t.name: load_split(t, "dev").examples[:5] for t in tasks}
    return model, tasks, examples, model.is_encoder_decoder


def test_mixed_batches_equal_each_example_alone(setup):
    model, tasks, examples, seq2seq = setup
    items = [(t, i, examples[task.name][i]) for t, task in enumerate(tasks) for i in range(5)]
    scored = [item for item in items if tasks[item[0]].labels]
    generated = [item for item in items if not tasks[item[0]].labels]
    mixed = _score_labels(model, TOKENIZER, tasks, scored, seq2seq, batch_size=7)
    alone = [_score_labels(model, TOKENIZER, tasks, [item], seq2seq, batch_size=7)[0] for item in scored]
    assert mixed == alone
    mixed = _generate(model, TOKENIZER, tasks, generated, seq2seq, batch_size=6)
    alone = [_generate(model, TOKENIZER, tasks, [item], seq2seq, batch_size=6)[0] for item in generated]
    assert mixed == alone
    assert len(set(mixed)) > 1  # the routed experts make task outputs differ


def test_results_per_task_and_table(setup):
    model, tasks, examples, seq2seq = setup
    results = evaluate(model, TOKENIZER, tasks, examples, seq2seq, batch_size=8, max_examples=4)
    assert set(results) == {t.name for t in tasks}
    assert all(r["examples"] == 4 and 0.0 <= r["score"] <= 100.0 for r in results.values())
    assert results["parity"]["metric"] == "accuracy" and results["reverse"]["metric"] == "exact_match"
    table = format_results({"stage1": results})
    assert "parity" in table and "stage1" in table


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
@pytest.mark.parametrize("router", ["hard", "gate", "token"])
def test_shared_prompt_label_scoring_equals_one_forward_per_pair(arch, router):
    """Mixed tasks, labels of 1 to 4 tokens, prompts of different lengths, gates pooling over the prompt."""
    base = synthetic_tasks(["rule"])
    uneven = dataclasses.replace(
        base[1], name="uneven", labels={"yes": "y", "no": "not at all", "maybe": "it might well be so"}
    )
    tasks = [base[0], uneven, base[2]]
    lengths = {len(TOKENIZER(" " + label, add_special_tokens=False)["input_ids"]) for label in uneven.labels.values()}
    assert len(lengths) == 3  # the labels really differ in token length
    model = MTAModel(tiny_backbone(arch), MTAConfig(num_shared_experts=1), tasks, RouterConfig(kind=router)).eval()
    perturb_experts(model)
    items = [(t, i, e) for t, task in enumerate(tasks) for i, e in enumerate(load_split(task, "dev").examples[:5])]
    items = items[::3] + items[1::3] + items[2::3]  # tasks interleaved
    assert len({len(TOKENIZER(e.prompt)["input_ids"]) for _, _, e in items}) > 1
    seq2seq = model.is_encoder_decoder
    reference = label_scores_per_pair(model, TOKENIZER, tasks, items, seq2seq, batch_size=4)
    shared = label_scores_shared_prompt(model, TOKENIZER, tasks, items, seq2seq, batch_size=4)
    assert [len(row) for row in shared] == [len(row) for row in reference]
    # fp32; the same sums over a different batch layout (left vs right padding, cache vs full sequence)
    flat = [torch.tensor([s for row in scores for s in row]) for scores in (shared, reference)]
    torch.testing.assert_close(flat[0], flat[1], rtol=0, atol=1e-5)
    assert len({round(s, 4) for row in reference for s in row}) > 3  # scores differ, so the check means something
    predictions = _score_labels(model, TOKENIZER, tasks, items, seq2seq, batch_size=4)
    assert predictions == [
        max(zip(row, dict.fromkeys(tasks[t].labels.values())))[1] for (t, _, _), row in zip(items, reference)
    ]
