"""Task examples: read a task's split from local files or a registered builder into prompt/target pairs.

Files are read line by line (JSON lines, CSV or TSV) so every problem names its ``file:line``: a malformed line,
a missing field, an unknown label. ``on_error: skip`` turns those into a counted, logged skip instead of a
failure. The clean examples then go into a Hugging Face ``datasets.Dataset`` for tokenisation.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alter_ds.config import SPLITS, TaskConfig
from alter_ds.errors import AlterDsError

log = logging.getLogger(__name__)

#: A builder makes the records of one split: (split, seed) -> records with the fields its task's template uses.
Builder = Callable[[str, int], list[dict[str, Any]]]
_BUILDERS: dict[str, Builder] = {}
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


class DataError(AlterDsError, ValueError):
    """A data problem, naming the task and, where there is one, the file and line."""


def register_builder(name: str) -> Callable[[Builder], Builder]:
    """Register a function that generates a task's records in code (``builder: NAME`` in a task spec)."""

    def decorator(function: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"builder {name!r} is already registered")
        _BUILDERS[name] = function
        return function

    return decorator


def builders() -> list[str]:
    import alter_ds.data.synthetic  # noqa: F401  (registers the synthetic families)

    return sorted(_BUILDERS)


@dataclass
class Example:
    """One example as the model sees it: prompt text, target text and, for classification, the raw label."""

    task: str
    prompt: str
    target: str
    label: str | None = None


@dataclass
class SplitData:
    task: str
    split: str
    examples: list[Example]
    skipped: int = 0
    source: str = ""
    problems: list[str] = field(default_factory=list)


def find_split_file(task: TaskConfig, split: str, root: Path) -> tuple[Path, str]:
    """The file holding ``split`` of ``task`` and its format; a DataError listing what was looked for."""
    if task.source is None:
        raise DataError(f"task {task.name!r} has neither a source nor a builder")
    source = Path(task.source)
    if not source.is_absolute():
        source = root / source
    if "{split}" in str(source):
        candidates = [Path(str(source).replace("{split}", split))]
    else:
        candidates = [source / f"{split}{ext}" for ext in (".jsonl", ".csv", ".tsv")]
    for path in candidates:
        if path.is_file():
            fmt = task.format if task.format != "auto" else FORMATS.get(path.suffix)
            if fmt is None:
                raise DataError(f"task {task.name!r}: cannot tell the format of {path}; set format: jsonl|csv|tsv")
            return path, fmt
    raise DataError(f"task {task.name!r}: no {split} split, looked for {', '.join(str(p) for p in candidates)}")


def _records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record) pairs; a string instead of a record describes why that line is malformed."""
    with path.open(newline="", encoding="utf-8") as handle:
        if fmt == "jsonl":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, f"invalid JSON ({error.msg} at column {error.colno})"
                    continue
                yield (
                    number,
                    record if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}",
                )
            return
        reader = csv.DictReader(handle, delimiter="\t" if fmt == "tsv" else ",")
        expected = len(reader.fieldnames or [])
        for row in reader:
            number = reader.line_num
            if None in row or any(value is None for value in row.values()):
                yield number, f"expected {expected} columns"
                continue
            yield number, dict(row)


def _to_example(task: TaskConfig, record: dict[str, Any]) -> Example | str:
    missing = [name for name in task.template_fields() if name not in record]
    if task.target_field not in record:
        missing.append(task.target_field)
    if missing:
        return f"missing field(s) {', '.join(repr(m) for m in missing)} (fields are {sorted(record)})"
    raw_target = record[task.target_field]
    label = None
    if task.labels:
        label = str(raw_target)
        if label not in task.labels:
            return f"unknown label {label!r} (known: {sorted(task.labels)})"
        target = task.labels[label]
    else:
        target = str(raw_target)
    try:
        prompt = task.template.format(**record)
    except (KeyError, IndexError, ValueError) as error:
        return f"template does not apply: {error}"
    return Example(task.name, prompt, target, label)


def load_split(task: TaskConfig, split: str, root: str | Path = ".", seed: int = 0) -> SplitData:
    """The examples of one split of one task, validated; see the module docstring for the error policy."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; one of {SPLITS}")
    limit = task.max_examples.get(split)
    if task.builder is not None:
        builders()
        if task.builder not in _BUILDERS:
            raise DataError(f"task {task.name!r}: unknown builder {task.builder!r}; registered: {builders()}")
        records = list(enumerate(_BUILDERS[task.builder](split, seed), start=1))
        source = f"builder {task.builder}"
        iterator: Iterator[tuple[int, dict[str, Any] | str]] = iter(records)
    else:
        path, fmt = find_split_file(task, split, Path(root))
        source = str(path)
        iterator = _records(path, fmt)
    data = SplitData(task.name, split, [], source=source)
    for number, record in iterator:
        if limit is not None and len(data.examples) >= limit:
            break
        example = _to_example(task, record) if isinstance(record, dict) else record
        if isinstance(example, Example):
            data.examples.append(example)
            continue
        problem = f"{source}:{number}: {example}"
        if task.on_error == "fail":
            raise DataError(f"task {task.name!r}: {problem} (set on_error: skip to skip such lines)")
        data.skipped += 1
        data.problems.append(problem)
    if data.skipped:
        log.warning("task %s %s: skipped %d bad line(s), first: %s", task.name, split, data.skipped, data.problems[0])
    if not data.examples:
        raise DataError(f"task {task.name!r}: the {split} split has no examples ({source})")
    return data


def split_examples(
    tasks: list[TaskConfig], split: str, root: str | Path = ".", seed: int = 0
) -> dict[str, list[Example]]:
    """Every task's examples of one split, keyed by task name (what evaluation reads)."""
    return {task.name: load_split(task, split, root, seed).examples for task in tasks}


def check_unique_names(tasks: list[TaskConfig]) -> None:
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise DataError(f"duplicate task name {task.name!r}")
        seen.add(task.name)


def to_dataset(data: SplitData) -> Any:
    """The examples as a ``datasets.Dataset`` (columns task, prompt, target, label)."""
    import datasets

    return datasets.Dataset.from_list(
        [{"task": e.task, "prompt": e.prompt, "target": e.target, "label": e.label or ""} for e in data.examples]
    )
