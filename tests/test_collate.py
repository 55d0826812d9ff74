"""Tokenisation for decoder-only and seq2seq models, loss masks, truncation, packing and batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_models import tiny_backbone, tiny_tokenizer

from alter_ds.config import DataConfig, MTAConfig, TaskConfig
from alter_ds.data.collate import IGNORE_INDEX, MultiTaskCollator, TokenizedExample, pack_examples, tokenize_example
from alter_ds.data.multitask import MultiTaskData, TrainBatches
from alter_ds.data.synthetic import synthetic_tasks
from alter_ds.data.tasks import load_split
from alter_ds.mta import MTAModel

TOKENIZER = tiny_tokenizer()
TASK = TaskConfig("t", template="{input}", max_input_tokens=6, max_target_tokens=4)


def test_decoder_only_loss_covers_the_target_only():
    example = tokenize_example(TOKENIZER, TASK, 2, "abc", "xy", seq2seq=False)
    prompt = TOKENIZER("abc")["input_ids"]
    target = TOKENIZER(" xy", add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]
    assert example.input_ids == prompt + target
    assert example.labels == [IGNORE_INDEX] * len(prompt) + target
    assert example.prompt_length == len(prompt) and example.task_id == 2


def test_truncation_per_task():
    long = tokenize_example(TOKENIZER, TASK, 0, "0123456789", "abcdefgh", seq2seq=False)
    assert TOKENIZER.decode(long.input_ids[: long.prompt_length]) == "456789"  # left: keeps the end
    assert len(long.input_ids) - long.prompt_length == 4 and long.input_ids[-1] == TOKENIZER.eos_token_id
    right = TaskConfig("t", truncation="right", max_input_tokens=6)
    cut = tokenize_example(TOKENIZER, right, 0, "0123456789", "a", seq2seq=False)
    assert TOKENIZER.decode(cut.input_ids[: cut.prompt_length]) == "012345"


def test_seq2seq_layout():
    example = tokenize_example(TOKENIZER, TASK, 1, "abc", "xyz", seq2seq=True)
    assert example.input_ids == TOKENIZER("abc")["input_ids"]
    assert example.labels == TOKENIZER(text_target="xyz")["input_ids"] + [TOKENIZER.eos_token_id]
    cut = tokenize_example(TOKENIZER, TASK, 1, "abc", "vwxyz", seq2seq=True)
    assert len(cut.labels) == 4


def test_collator_pads_and_carries_task_ids():
    a = TokenizedExample(0, [5, 6, 7], [IGNORE_INDEX, 6, 7], 1)
    b = TokenizedExample(3, [8], [8], 0)
    right = MultiTaskCollator(pad_token_id=0, seq2seq=False)([a, b])
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert right["prompt_mask"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert right["task_ids"].tolist() == [0, 3]
    left = MultiTaskCollator(pad_token_id=0, seq2seq=True, padding_side="left")([a, b])
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and "prompt_mask" not in left


def test_packing_keeps_tasks_apart_and_labels_intact():
    examples = [TokenizedExample(t, [t + 1] * n, [t + 1] * n, 1) for t, n in [(0, 3), (0, 4), (0, 5), (1, 2), (1, 2)]]
    packed = pack_examples(examples, max_length=8)
    assert [(p.task_id, len(p.input_ids)) for p in packed] == [(0, 7), (0, 5), (1, 4)]
    assert sum(len(p.labels) for p in packed) == sum(len(e.labels) for e in examples)


def test_synthetic_batches_train_a_model_with_the_target_loss(tmp_path):
    tasks = synthetic_tasks(["string", "rule"])
    data = MultiTaskData.load(tasks, TOKENIZER, seq2seq=False, split="dev")
    batches = TrainBatches(data, DataConfig(sampling="uniform"), MultiTaskCollator(TOKENIZER.pad_token_id, False), 4)
    batch = batches.next_batch()
    model = MTAModel(tiny_backbone("gpt2"), MTAConfig(), tasks).eval()
    out = model(**batch)
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)
    assert set(batch["task_ids"].tolist()) <= set(range(len(tasks)))


def test_rank_batches_partition_the_global_batch():
    tasks = synthetic_tasks(["arithmetic"])
    data = MultiTaskData.load(tasks, TOKENIZER, seq2seq=False, split="dev")
    collator = MultiTaskCollator(TOKENIZER.pad_token_id, False)
    single = TrainBatches(data, DataConfig(), collator, micro_batch_size=4, world_size=1)
    ranks = [TrainBatches(data, DataConfig(), collator, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p["task_ids"] for p in parts]), whole["task_ids"])
        for part, rows in zip(parts, (slice(0, 2), slice(2, 4))):
            width = part["input_ids"].shape[1]
            assert torch.equal(part["input_ids"], whole["input_ids"][rows, :width])


def test_training_examples_are_tokenised_on_first_draw_and_equal_eager_tokenisation():
    tasks = synthetic_tasks(["string"])
    data = MultiTaskData.load(tasks, TOKENIZER, seq2seq=False, split="train")
    assert all(not task.cache for task in data.examples)  # nothing tokenised at load
    batches = TrainBatches(data, DataConfig(), MultiTaskCollator(TOKENIZER.pad_token_id, False), 4)
    for _ in range(3):
        batches.next_batch()
    drawn = sum(len(task.cache) for task in data.examples)
    assert 0 < drawn <= 12 < sum(data.sizes())
    for task_id, (task, tokenized) in enumerate(zip(tasks, data.examples)):
        raw = load_split(task, "train").examples
        for index in (0, len(raw) - 1, *tokenized.cache):
            expected = tokenize_example(TOKENIZER, task, task_id, raw[index].prompt, raw[index].target, False)
            assert tokenized[index] == expected
        assert tokenized[-1] == tokenized[len(raw) - 1] and tokenized[:2] == [tokenized[0], tokenized[1]]
