"""Resuming a killed or preempted training run exactly: its saved state, the stop signals,
and the lock that keeps a second trainer out of its work folder.

A step's data is a pure function of its number, so the resume state holds only the weights,
the optimizer's moments and step counts, the RNG states and the curve so far (``Progress``),
and a resumed run computes bit for bit what the uninterrupted one would have. The state
belongs to one ``RunSpec`` (``spec_hash``): a state of another spec is stale and discarded,
while a change of the engine settings (``EngineSettings``) resumes. The tensors are saved
whole, unsharded, so a state saved by one process loads into DDP or FSDP processes and back.

One trainer at a time works in a run's work folder (``exclusive_work``): a second one, say
started by a re-run of Snakemake while an orphaned trainer still runs, would resume from the
same state and both would publish, the last replacing the other's checkpoints. A trunk's
states folder (train.schedule wsd) has such a lock too; the runs that grow it wait for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from workflow.atomic import atomic_path
from workflow.distributed import Communication, Processes, any_process
from workflow.errors import TrainError
from workflow.paths import checkpoint_path
from workflow.settings import Cooldown, RunSpec, TrunkSpec
from workflow.telemetry import Progress, log

# Whole (unsharded) tensors on the host, keyed by parameter name: a state saved by one
# process loads into DDP or FSDP processes and back. Under FSDP only rank 0 gets them.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# The layout of resume.pt; a state of another layout (an older trainer's) is discarded.
RESUME_FORMAT = 2


class StopSignals:
    """Inside the block, SIGTERM and SIGINT only record themselves in ``received``.

    The loop checks it between steps, saves a resume state and exits, instead of dying
    mid-step; the previous handlers come back when the block ends. Under torchrun the
    launcher passes a SIGTERM on to every process.
    """

    def __enter__(self) -> StopSignals:
        self.received: int | None = None
        self._previous = {
            number: signal.signal(number, self._handle)
            for number in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(self, *exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, _frame) -> None:
        self.received = number


def spec_hash(spec: RunSpec | TrunkSpec, cooldown: Cooldown | None = None) -> str:
    """Identity of a run (or trunk) for resuming: a resume state of another spec is stale. A
    warmup-stable-decay run's identity includes its cooldown."""
    text = spec.to_json() + (cooldown.to_json() if cooldown is not None else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gathered_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Weights and optimizer state of the model; every process must call it (FSDP gathers)."""
    return get_state_dict(objective, optimizer, options=FULL_STATE)


def restore_state(objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_state_dict(
        objective,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def load_state(path: Path, lazily: bool = False) -> dict:
    """A saved training state; ``lazily`` maps its tensors instead of reading them, for a look
    at its step and identity."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=lazily)


def load_resume_state(
    path: Path, expected_hash: str, checkpoints_dir: Path, spec: RunSpec
) -> dict | None:
    """The saved state if it belongs to this spec and its checkpoints are all there."""
    if not path.exists():
        return None
    state = load_state(path)
    if state.get("format") != RESUME_FORMAT:
        log(f"{spec.run}: discarding a resume state written by another trainer ({path})")
        return None
    if state["spec_hash"] != expected_hash:
        log(f"{spec.run}: discarding the resume state of a different spec ({path})")
        return None
    saved = [step for step in spec.checkpoint_steps if step <= state["progress"]["step"]]
    missing = missing_checkpoints(checkpoints_dir, saved)
    if missing:
        log(f"{spec.run}: discarding the resume state: checkpoints {missing} are missing")
        return None
    return state


def missing_checkpoints(checkpoints_dir: Path, steps: list[int]) -> list[int]:
    """The steps among ``steps`` whose checkpoint folder is not in ``checkpoints_dir``."""
    return [step for step in steps if not Path(checkpoint_path(checkpoints_dir, step)).is_dir()]


def save_resume_state(
    path: Path,
    identity: str,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    device: torch.device,
    processes: Processes,
) -> None:
    """Save the state to resume from at ``progress``'s step; every process must call it
    (the weights are gathered and the loss sum summed), rank 0 writes it."""
    weights, optimizer_state = gathered_state(objective, optimizer)
    saved = {
        "format": RESUME_FORMAT,
        "spec_hash": identity,
        "model": weights,
        "optimizer": optimizer_state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy_rng": np.random.get_state(),
        "progress": progress.saved(),
    }
    if processes.is_main:
        with atomic_path(path) as temporary:
            torch.save(saved, temporary)


@contextmanager
def exclusive_work(lock: Path, run: str, comm: Communication, wait: bool = False) -> Iterator[None]:
    """Hold the run's work folder alone for the block, or stop every process with a
    ``TrainError`` naming the trainer that holds it. Rank 0 takes the lock for all; with
    ``wait`` it waits for the holder instead (the other processes wait for rank 0)."""
    descriptor, refusal = None, None
    if comm.processes.is_main:
        try:
            descriptor = take_lock(lock, run, wait)
        except TrainError as error:
            refusal = error
    if any_process(refusal is not None, comm):
        raise refusal or TrainError(f"{run}: another trainer holds {lock} (see rank 0's log)")
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def take_lock(lock: Path, run: str, wait: bool = False) -> int:
    """An exclusive ``flock`` on ``lock``, which records this process; its open descriptor.

    The kernel releases the lock when the process ends, however it ends: a killed trainer's
    lock passes to the next without anyone removing it. The finished trainer removes the lock
    with its work folder, so a lock won on a file that is no longer there is tried again.
    Held by another process, the lock is refused, or with ``wait`` waited for.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode(errors="replace")
            if not wait:
                os.close(descriptor)
                raise TrainError(refusal(run, lock, holder)) from None
            log(f"{run}: waiting for {lock}, held by {holder.strip() or 'another trainer'}")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        opened = os.fstat(descriptor)
        if current and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(descriptor)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    return descriptor


def refusal(run: str, lock: Path, recorded: str) -> str:
    """The message of a trainer refused because the one ``recorded`` in ``lock`` runs."""
    try:
        holder = json.loads(recorded)
        who = f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
        stop = f"stop it (`kill {holder['pid']}` on {holder['host']})"
    except (ValueError, KeyError, TypeError):
        who, stop = "it has not recorded its pid yet", "stop it"
    return (
        f"{run}: another trainer is training this run ({who}) and holds {lock}; two trainers "
        f"would overwrite each other's checkpoints. Wait for it to finish, or {stop} and "
        "re-run, which resumes from its last saved state."
    )


def clear_work(work: Path, lock: Path) -> None:
    """Empty the work folder for a fresh start, all but the ``lock`` this process holds."""
    for entry in work.iterdir():
        if entry == lock:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
