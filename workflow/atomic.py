"""Write outputs so that a killed job never leaves something that looks finished.

Snakemake treats an existing output as done. Every stage therefore writes to a temporary
sibling path and renames it into place only after the content is complete; a rename
within one directory is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workflow.integrity import remove_stale_temporaries


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it onto ``final`` if the block succeeds.

    Works for files and directories. On an exception the temporary path is removed and
    ``final`` is left as it was; what a killed writer of ``final`` left beside it is removed
    first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
        if final.is_dir() and temporary.is_dir():
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        _remove(temporary)


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
