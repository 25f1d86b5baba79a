"""Prepare stage: one dataset's documents, deduplicated and split into train and validation.

The split is by document and decided by a hash of the document's text, so it is the same on
every machine and for every run, and identical documents (dropped as duplicates) can never
land on both sides. Training documents are written in hash order, a fixed pseudo-random
shuffle: a run that reads the stream from its start then sees a mix of the whole corpus
rather than one file or topic after another.

To keep memory bounded for corpora far larger than RAM (a streamed hub dataset), documents
are first spread over 256 temporary bucket files by the first byte of their hash; each bucket
is then deduplicated and sorted on its own, and the buckets are concatenated in order.

    python -m workflow.prepare --name NAME --source JSON --val-fraction F --out-dir DIR \
        --cache-dir CACHE
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from workflow.atomic import atomic_path
from workflow.paths import corpus_file, corpus_manifest
from workflow.sources import CORPORA, SourceError, offline_documents

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
PROGRESS_SECONDS = 10.0


# --- sources --------------------------------------------------------------------------


def file_documents(
    paths: list[str], file_format: str | None = None, text_field: str = "text"
) -> Iterator[str]:
    """Documents of local files: a whole .txt file, or one JSONL line / Parquet row each.

    A path may be a glob pattern (``data/**/*.jsonl``). A .txt file is one document, so
    that a document is never cut in the middle; split a long text into files to get more.
    """
    for path in _expand(paths):
        path_format = file_format or FORMATS.get(path.suffix)
        if path_format is None:
            raise SourceError(
                f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                f"set `format` on the source to one of {sorted(set(FORMATS.values()))}"
            )
        if path_format == "txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path_format == "jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)


def _expand(patterns: list[str]) -> Iterator[Path]:
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise SourceError(f"no file matches {pattern!r} (source paths)")
        for match in matches:
            if Path(match).is_dir():
                raise SourceError(f"{match} is a directory; name its files, e.g. {match}/*.txt")
            yield Path(match)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SourceError(f"{path}:{number}: not a JSON object: {error}") from error
                yield _text_of(row, text_field, f"{path}:{number}")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise SourceError(
            f"{path}: no column {text_field!r} (set `text_field`); "
            f"columns: {parquet.schema_arrow.names}"
        )
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text or "" for text in batch.column(0).to_pylist())


def _text_of(row: dict, text_field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: a document must be an object with a {text_field!r} field")
    if text_field not in row:
        raise SourceError(f"{where}: no field {text_field!r} (set `text_field`); has {list(row)}")
    if not isinstance(row[text_field], str | None):
        raise SourceError(f"{where}: field {text_field!r} is not a string")
    return row[text_field] or ""


def hub_documents(
    path: str,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    data_files: str | list | dict | None = None,
) -> Iterator[str]:
    """Up to ``max_documents`` documents of a dataset streamed with ``datasets``.

    A hub name (``allenai/c4``) needs network access to huggingface.co; a builder name with
    local ``data_files`` (``path="json"``) streams local files through the same code.
    """
    import datasets  # slow to import, and only hub sources need it

    where = f"dataset {path!r} (name={name!r}, split={split!r})"
    try:
        stream = datasets.load_dataset(
            path, name, split=split, streaming=True, data_files=data_files
        )
        for row in itertools.islice(stream, max_documents):
            yield _text_of(row, text_field, where)
    except SourceError:
        raise
    except Exception as error:  # datasets raises many types; the user needs which and why
        raise SourceError(
            f"cannot stream {where}: {type(error).__name__}: {error}. Hub names need network "
            "access to huggingface.co (and HF_HUB_OFFLINE unset)."
        ) from error


def source_documents(source: dict, cache_dir: str | Path) -> tuple[Iterator[str], dict]:
    """The documents of a config ``source`` and the package versions used (offline only)."""
    kind = source["kind"]
    if kind == "offline":
        return offline_documents(source["corpus"], cache_dir, source.get("pinned", True))
    if kind == "files":
        documents = file_documents(
            source["paths"], source.get("format"), source.get("text_field", "text")
        )
        return documents, {}
    if kind == "hub":
        options = {key: value for key, value in source.items() if key != "kind"}
        return hub_documents(**options), {}
    raise SourceError(f"unknown source kind {kind!r}; allowed: offline, files, hub")


# --- split ----------------------------------------------------------------------------


def document_key(text: str) -> str:
    """The hex sha1 of the text: identity for deduplication, split decision and order."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def is_validation(key: str, val_fraction: float) -> bool:
    """The first 64 bits of the key, as a fraction of 2**64, fall below ``val_fraction``."""
    return int(key[:16], 16) < val_fraction * 2**64


class _Progress:
    """Logs documents, MB and seconds every few seconds, so a long read shows it is alive."""

    def __init__(self, what: str):
        self.what = what
        self.start = self.last = time.monotonic()
        self.documents = 0
        self.bytes = 0

    def add(self, n_bytes: int) -> None:
        self.documents += 1
        self.bytes += n_bytes
        if time.monotonic() - self.last >= PROGRESS_SECONDS:
            self.report()

    def report(self) -> None:
        self.last = time.monotonic()
        log.info(
            "%s: %d documents, %.1f MB, %.1f s",
            self.what,
            self.documents,
            self.bytes / 1e6,
            self.last - self.start,
        )


def _fill_buckets(documents: Iterable[str], bucket_dir: Path, counts: dict) -> None:
    """Spread documents over bucket files (``key \\t bytes \\t json line``) by key prefix."""
    bucket_dir.mkdir()
    handles = {}
    progress = _Progress("read")
    try:
        for document in documents:
            counts["read"] += 1
            text = document.strip()
            n_bytes = len(text.encode("utf-8"))
            progress.add(n_bytes)
            if not text:
                counts["empty"] += 1
                continue
            key = document_key(text)
            line = json.dumps({"text": text}, ensure_ascii=False)
            if key[:2] not in handles:
                handles[key[:2]] = (bucket_dir / key[:2]).open("w", encoding="utf-8")
            handles[key[:2]].write(f"{key}\t{n_bytes}\t{line}\n")
    finally:
        for handle in handles.values():
            handle.close()
    progress.report()


def _write_splits(bucket_dir: Path, out_dir: Path, val_fraction: float, counts: dict) -> dict:
    """Deduplicate, sort and split the buckets into the split files; returns the hashes."""
    corpus_hash = hashlib.sha256()
    split_hashes = {split: hashlib.sha256() for split in SPLITS}
    n_bytes = dict.fromkeys(SPLITS, 0)
    with contextlib.ExitStack() as stack:
        files = {split: Path(corpus_file(out_dir, split)) for split in SPLITS}
        handles = {
            split: stack.enter_context(file.open("w", encoding="utf-8"))
            for split, file in files.items()
        }
        for bucket in sorted(bucket_dir.iterdir()):
            unique = {}
            with bucket.open(encoding="utf-8") as records:
                for record in records:
                    key, size, line = record.split("\t", 2)
                    if key in unique:
                        counts["duplicate"] += 1
                    unique[key] = (int(size), line)
            for key in sorted(unique):
                size, line = unique[key]
                split = "val" if is_validation(key, val_fraction) else "train"
                encoded = line.encode("utf-8")
                corpus_hash.update(encoded)
                split_hashes[split].update(encoded)
                handles[split].write(line)
                counts[split] += 1
                n_bytes[split] += size
            bucket.unlink()
    bucket_dir.rmdir()
    return {
        "bytes": n_bytes,
        "sha256": {
            "corpus": corpus_hash.hexdigest(),
            **{split: split_hashes[split].hexdigest() for split in SPLITS},
        },
    }


def _check_corpus_hash(source: dict, got: str) -> tuple[str | None, bool | None]:
    """Compare an offline corpus with its pin: an error when pinned, else a loud warning."""
    if source["kind"] != "offline":
        return None, None
    expected = CORPORA[source["corpus"]].sha256
    if got == expected:
        return expected, True
    message = f"offline corpus {source['corpus']}: sha256 {got} differs from the pinned {expected}"
    if source.get("pinned", True):
        raise SourceError(
            f"{message}, although its package versions are the pinned ones (did the extraction "
            "code change?). Fix: update the pin in workflow/sources.py if the change is "
            "intended, or set `pinned: false` on this dataset's source."
        )
    log.warning("WARNING: %s; this is not the pinned corpus (pinned: false)", message)
    return expected, False


def prepare(
    name: str, source: dict, val_fraction: float, out_dir: str | Path, cache_dir: str | Path
) -> dict:
    """Build ``out_dir`` with train.jsonl, val.jsonl and manifest.json; returns the manifest.

    ``out_dir`` appears only when complete. The manifest's ``sha256.corpus`` hashes every
    unique document (as its JSON line, in key order) and does not depend on ``val_fraction``,
    so two machines can compare corpora; ``sha256.train``/``val`` are the files' hashes.
    """
    if not 0 < val_fraction < 1:
        raise SourceError(f"datasets.{name}.val_fraction must be in (0, 1), got {val_fraction}")
    start = time.monotonic()
    counts = dict.fromkeys(("read", "empty", "duplicate", *SPLITS), 0)
    with atomic_path(out_dir) as temporary:
        temporary.mkdir(parents=True)
        documents, versions = source_documents(source, cache_dir)
        _fill_buckets(documents, temporary / ".buckets", counts)
        written = _write_splits(temporary / ".buckets", temporary, val_fraction, counts)
        for split in SPLITS:
            if counts[split] == 0:
                raise SourceError(
                    f"dataset {name}: the {split} split is empty ({counts['train'] + counts['val']}"
                    f" unique documents, val_fraction {val_fraction}); change val_fraction or "
                    "add documents"
                )
            log.info(
                "%s: %d documents, %.2f MB",
                split,
                counts[split],
                written["bytes"][split] / 1e6,
            )
        expected, matches = _check_corpus_hash(source, written["sha256"]["corpus"])
        manifest = {
            "name": name,
            "source": source,
            "val_fraction": val_fraction,
            "versions": versions,
            "documents": counts,
            **written,
            "expected_corpus_sha256": expected,
            "corpus_sha256_matches": matches,
            "seconds": round(time.monotonic() - start, 2),
        }
        Path(corpus_manifest(temporary)).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("%s: corpus sha256 %s, %.1f s", name, written["sha256"]["corpus"], manifest["seconds"])
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the dataset's name in the config")
    parser.add_argument("--source", required=True, help="the dataset's `source`, as JSON")
    parser.add_argument("--val-fraction", type=float, required=True)
    parser.add_argument("--out-dir", required=True, help="R/corpus/{dataset}")
    parser.add_argument("--cache-dir", required=True, help="downloaded packages, shared")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    try:
        prepare(args.name, json.loads(args.source), args.val_fraction, args.out_dir, args.cache_dir)
    except SourceError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
