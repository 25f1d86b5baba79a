"""Outputs of earlier stages checked before use, and what a killed stage left behind.

Snakemake trusts an output that exists. Where checking costs next to nothing (file sizes
against a listing, a checkpoint's files), a stage checks what it reads and names the output
and the command that rebuilds it, instead of failing deep inside a library or computing on
damaged data. ``workflow.atomic.atomic_path`` writes ``.NAME.tmp-PID`` beside an output and
removes it unless the process is killed; the next run of the stage removes those of dead
processes (``remove_stale_temporaries``).

Standard library only: every stage's environment imports it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# What ``save_pretrained`` writes for a model: its config and its weights, whole or sharded.
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class DamagedOutputError(ValueError):
    """An earlier stage's output that is incomplete or damaged; the message names it and the
    command that rebuilds it."""


def rebuild_hint(output: str | Path, action: str) -> str:
    """How to make Snakemake rebuild ``output`` (and redo what was computed from it)."""
    return (
        f"{action} with `snakemake --forcerun {output}` (or delete {output} and re-run snakemake)"
    )


def check_checkpoint(directory: str | Path) -> None:
    """Refuse a checkpoint folder without its config or its weights."""
    directory = Path(directory)
    missing = []
    if not (directory / CHECKPOINT_CONFIG).is_file():
        missing.append(CHECKPOINT_CONFIG)
    if not any((directory / name).is_file() for name in CHECKPOINT_WEIGHTS):
        missing.append(CHECKPOINT_WEIGHTS[0])
    if not directory.is_dir():
        problem = "does not exist"
    elif missing:
        problem = f"is incomplete: {' and '.join(missing)} missing"
    else:
        return
    raise DamagedOutputError(
        f"checkpoint {directory} {problem}. A run's checkpoints come from its training: "
        + rebuild_hint(directory.parent, "retrain the run")
    )


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Remove the temporaries of ``final`` (``.NAME.tmp-PID``) whose process has died.

    A temporary of a live process is another writer's work in progress and stays. The PID
    is looked up on this host, so a temporary written from another host on a shared file
    system is removed unless a process of that number happens to run here.
    """
    final = Path(final)
    prefix = f".{final.name}.tmp-"
    if not final.parent.is_dir():
        return []
    removed = []
    for sibling in sorted(final.parent.iterdir()):
        pid = sibling.name.removeprefix(prefix)
        if pid == sibling.name or not pid.isdigit() or process_alive(int(pid)):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        print(f"removed {sibling}, left by process {pid}, which has ended", file=sys.stderr)
        removed.append(sibling)
    return removed
