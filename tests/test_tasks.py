"""Task specs and readers: jsonl/csv/tsv fixtures, builders, caps, and every bad-input case."""

from __future__ import annotations

import json
import logging

import pytest

from alter_ds.config import TaskConfig
from alter_ds.data.multitask import MultiTaskData
from alter_ds.data.tasks import DataError, load_split, to_dataset

SENTIMENT = dict(template="Review: {text}\nSentiment:", target_field="label", labels={"0": "negative", "1": "positive"})


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def sentiment_dir(tmp_path):
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        write_jsonl(
            tmp_path / "sent" / f"{split}.jsonl", [{"text": f"{split} {i}", "label": str(i % 2)} for i in range(n)]
        )
    return tmp_path


def test_jsonl_with_template_and_verbaliser(sentiment_dir):
    task = TaskConfig("sent", source="sent", metric="accuracy", **SENTIMENT)
    data = load_split(task, "train", sentiment_dir)
    assert len(data.examples) == 6 and data.skipped == 0
    first = data.examples[1]
    assert first.prompt == "Review: train 1\nSentiment:" and first.target == "positive" and first.label == "1"
    dataset = to_dataset(data)
    assert dataset.column_names == ["task", "prompt", "target", "label"] and len(dataset) == 6


@pytest.mark.parametrize("fmt, delimiter", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv(tmp_path, fmt, delimiter):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / f"train.{fmt}").write_text(f'text{delimiter}target\nhello{delimiter}world\n"a, b"{delimiter}c\n')
    data = load_split(TaskConfig("t", source="t", template="say {text}"), "train", tmp_path)
    assert [(e.prompt, e.target) for e in data.examples] == [("say hello", "world"), ("say a, b", "c")]


def test_split_pattern_builder_and_cap(tmp_path):
    write_jsonl(tmp_path / "x.train.jsonl", [{"input": str(i), "target": "y"} for i in range(5)])
    task = TaskConfig("x", source=str(tmp_path / "x.{split}.jsonl"), max_examples={"train": 3})
    assert len(load_split(task, "train").examples) == 3
    built = load_split(TaskConfig("r", builder="synthetic/reverse", template="{input}"), "dev")
    assert all(e.target == e.prompt[::-1] for e in built.examples)


def test_missing_file_and_empty_task(tmp_path):
    with pytest.raises(DataError, match=r"task 'gone': no train split, looked for .*gone/train.jsonl"):
        load_split(TaskConfig("gone", source="gone"), "train", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the train split has no examples"):
        load_split(TaskConfig("empty", source="empty"), "train", tmp_path)
    with pytest.raises(DataError, match="neither a source nor a builder"):
        load_split(TaskConfig("nothing"), "train", tmp_path)
    with pytest.raises(DataError, match="unknown builder"):
        load_split(TaskConfig("b", builder="synthetic/nope"), "train", tmp_path)


BAD_LINES = [
    ('{"text": "ok", "label": "1"}\n{"text": "broken", \n', 2, "invalid JSON"),
    ('{"text": "ok", "label": "1"}\n["a list"]\n', 2, "expected a JSON object"),
    ('{"text": "ok", "label": "1"}\n{"txt": "x", "label": "0"}\n', 2, "missing field(s) 'text'"),
    ('{"text": "ok", "label": "1"}\n{"text": "x", "label": "7"}\n', 2, "unknown label '7'"),
]


@pytest.mark.parametrize("content, line, message", BAD_LINES)
def test_bad_lines_fail_with_file_and_line(tmp_path, content, line, message):
    (tmp_path / "t").mkdir()
    path = tmp_path / "t" / "train.jsonl"
    path.write_text(content)
    task = TaskConfig("t", source="t", metric="accuracy", **SENTIMENT)
    with pytest.raises(DataError) as error:
        load_split(task, "train", tmp_path)
    assert f"{path}:{line}: " in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("content, line, message", BAD_LINES)
def test_bad_lines_are_skipped_counted_and_logged(tmp_path, caplog, content, line, message):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text(content)
    task = TaskConfig("t", source="t", metric="accuracy", on_error="skip", **SENTIMENT)
    with caplog.at_level(logging.WARNING):
        data = load_split(task, "train", tmp_path)
    assert len(data.examples) == 1 and data.skipped == 1
    assert "skipped 1 bad line" in caplog.text and message in caplog.text


def test_csv_with_a_short_row_names_its_line(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.csv").write_text("text,target\na,b\nonly_one_column\n")
    with pytest.raises(DataError, match=r"train.csv:3: expected 2 columns"):
        load_split(TaskConfig("t", source="t", template="{text}"), "train", tmp_path)


def test_duplicate_task_names(tmp_path, sentiment_dir):
    task = TaskConfig("sent", source="sent", metric="accuracy", **SENTIMENT)
    with pytest.raises(DataError, match="duplicate task name 'sent'"):
        MultiTaskData.load([task, task], tokenizer=None, seq2seq=False, split="train", root=sentiment_dir)


def test_task_spec_validation():
    from alter_ds.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="template: not a valid format string"):
        config_from_dict(TaskConfig, {"name": "t", "template": "{oops"})
    with pytest.raises(ConfigError, match="labels: metric accuracy scores labels"):
        config_from_dict(TaskConfig, {"name": "t", "metric": "accuracy"})
    with pytest.raises(ConfigError, match="builder: give either source or builder"):
        config_from_dict(TaskConfig, {"name": "t", "source": "a", "builder": "b"})
    with pytest.raises(ConfigError, match=r"max_examples.val: unknown split"):
        config_from_dict(TaskConfig, {"name": "t", "max_examples": {"val": 3}})


def test_check_config_data_reads_every_split_before_training(tmp_path, capsys):
    from alter_ds.cli import main

    good = [{"text": f"t{i}", "label": str(i % 2)} for i in range(5)]
    task_dir = tmp_path / "data" / "spam"
    task_dir.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (task_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "model: {name_or_path: m}\n"
        "tasks:\n"
        "  - {name: spam, source: data/spam, template: 'SMS: {text}', target_field: label,\n"
        "     labels: {'0': ham, '1': spam}, metric: accuracy}\n"
        f"data: {{root: {tmp_path}}}\n"
    )
    assert main(["check-config", str(config), "--data"]) == 0
    (task_dir / "dev.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"body": "x", "label": "1"}) + "\n")
    (task_dir / "test.jsonl").write_text(json.dumps({"text": "x", "label": "7"}) + "\n")
    capsys.readouterr()
    assert main(["check-config", str(config), "--data", "10"]) == 2
    err = capsys.readouterr().err
    assert f"{task_dir / 'dev.jsonl'}:2: missing field(s) 'text'" in err
    assert f"{task_dir / 'test.jsonl'}:1: unknown label '7'" in err
    assert "train.jsonl" not in err
