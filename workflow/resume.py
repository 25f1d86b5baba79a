"""Resuming a killed or preempted training run exactly: its saved state and the stop signals.

A step's data is a pure function of its number, so the resume state holds only the weights,
the optimizer's moments and step counts, the RNG states and the curve so far (``Progress``),
and a resumed run computes bit for bit what the uninterrupted one would have. The state
belongs to one ``RunSpec`` (``spec_hash``): a state of another spec is stale and discarded,
while a change of the engine settings (``EngineSettings``) resumes. The tensors are saved
whole, unsharded, so a state saved by one process loads into DDP or FSDP processes and back.
"""

from __future__ import annotations

import hashlib
import signal
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
from workflow.distributed import Processes
from workflow.paths import checkpoint_path
from workflow.settings import RunSpec
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


def spec_hash(spec: RunSpec) -> str:
    """Identity of a run for resuming: a resume state of another spec is stale."""
    return hashlib.sha256(spec.to_json().encode()).hexdigest()[:16]


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


def load_resume_state(
    path: Path, expected_hash: str, checkpoints_dir: Path, spec: RunSpec
) -> dict | None:
    """The saved state if it belongs to this spec and its checkpoints are all there."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != RESUME_FORMAT:
        log(f"{spec.run}: discarding a resume state written by another trainer ({path})")
        return None
    if state["spec_hash"] != expected_hash:
        log(f"{spec.run}: discarding the resume state of a different spec ({path})")
        return None
    missing = [
        step
        for step in spec.checkpoint_steps
        if step <= state["progress"]["step"]
        and not Path(checkpoint_path(checkpoints_dir, step)).is_dir()
    ]
    if missing:
        log(f"{spec.run}: discarding the resume state: checkpoints {missing} are missing")
        return None
    return state


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
