"""The step loop a run and a trunk share: batches by step number, logging, resume states, stops.

A run (``workflow.train``) and a trunk (``workflow.trunk``, train.schedule wsd) step the same
way and differ in their learning rate, in what they save at chosen steps (a run its
checkpoints, a trunk its full state at each branch point) and in how far they go. So that a
run branched from a trunk computes bit for bit what the same run trained alone would, both go
through ``advance``: step k reads the stream's batch k, the curve gets a row every
``log_every`` steps (and at a run's last step), and the resume state is saved every
``resume_every`` steps and on a stop signal.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workflow.device import to_device
from workflow.distributed import PARALLELISMS, Communication, Processes, any_process
from workflow.errors import TrainError
from workflow.resume import StopSignals, save_resume_state
from workflow.settings import EngineSettings, RunSpec, TrunkSpec
from workflow.shards import TokenShards, read_batch, tokens_needed
from workflow.step import Batch, Trainer, train_step
from workflow.telemetry import Progress, curve_row, format_row, log


@dataclass
class Loop:
    """What ``advance`` steps with: the trainer, its data and where it saves its resume state.

    ``tokens`` is the length of the stream the batches are cut from (a run's D; a trunk's
    furthest branch point, which every batch before it fills); ``last_step`` is a run's last
    step, which gets a curve row whatever ``log_every`` says (None for a trunk, whose rows
    must be the ones its runs would have had).
    """

    spec: RunSpec | TrunkSpec
    engine: EngineSettings
    shards: TokenShards
    trainer: Trainer
    comm: Communication
    device: torch.device
    peak: float | None
    tokens: int
    last_step: int | None
    resume_state: Path
    identity: str
    stop: StopSignals

    @property
    def logged_steps(self) -> int:
        """The step the log's ETA counts to."""
        return self.last_step or math.ceil(self.tokens / self.spec.tokens_per_step)


def check_data(
    spec: RunSpec | TrunkSpec,
    tokens: int,
    shards: TokenShards,
    engine: EngineSettings,
    processes: Processes,
) -> None:
    """Refuse, before building anything, a run or trunk of ``tokens`` whose numbers do not
    add up: too little data, a larger vocabulary than the model's, an uneven batch split."""
    name = spec.run
    needed = tokens_needed(tokens, spec.shape["context_length"], spec.data_order)
    if shards.n_tokens < needed:
        raise TrainError(
            f"{name}: needs {needed:,} tokens of {shards.directory} (D = {tokens:,} "
            f"targets in whole sequences, plus the first input) but it holds "
            f"{shards.n_tokens:,}; short by {needed - shards.n_tokens:,}. Train on more data or "
            "lower the multiplier."
        )
    if shards.vocab_size > spec.shape["vocab_size"]:
        raise TrainError(
            f"{name}: the token ids of {shards.directory} come from a vocabulary of "
            f"{shards.vocab_size}, larger than the model's vocab_size "
            f"{spec.shape['vocab_size']}"
        )
    if spec.batch_size % processes.world_size:
        raise TrainError(
            f"{name}: a batch of {spec.batch_size} sequences does not split evenly over "
            f"{processes.world_size} processes; use a batch size divisible by the GPU count"
        )
    if engine.parallelism not in PARALLELISMS:
        raise TrainError(f"{name}: parallelism must be one of {PARALLELISMS}")


def advance(
    loop: Loop,
    progress: Progress,
    until: int,
    learning_rate: Callable[[int], float],
    at_step: Callable[[int], None],
) -> None:
    """Train from ``progress``'s step to ``until``; ``at_step(step)`` after each step.

    Raises TrainError when the loss turns non-finite, and SystemExit(128 + signal) after saving
    the resume state when a stop signal arrives before ``until``.
    """
    spec, engine, processes = loop.spec, loop.engine, loop.comm.processes
    trainer, name = loop.trainer, loop.spec.run
    context_length = spec.shape["context_length"]
    while progress.step < until:
        inputs, targets, n_targets = read_batch(
            loop.shards,
            progress.step,
            spec.batch_size,
            context_length,
            loop.tokens,
            processes,
            spec.data_order,
        )
        batch = Batch(to_device(inputs, loop.device), to_device(targets, loop.device), n_targets)
        lr = learning_rate(progress.step + 1)
        progress.loss_sum += train_step(
            trainer.objective, trainer.optimizer, batch, lr, trainer.settings
        )
        progress.step += 1
        progress.timed_tokens += n_targets
        step = progress.step

        if step % engine.log_every == 0 or step == loop.last_step:
            row = curve_row(progress, spec, loop.tokens, lr, loop.peak)
            progress.curve.append(row)
            if processes.is_main:
                log(format_row(row, loop.logged_steps, loop.tokens))
            if not math.isfinite(row["loss"]):  # later steps would be meaningless
                reason = f"the training loss is {row['loss']} at step {step}"
                if processes.is_main:
                    log(f"DIVERGED: {name}: {reason}")
                raise TrainError(
                    f"{name}: diverged: {reason}; stopped. Lower the size's lr or raise "
                    "its warmup, then re-run"
                )
        at_step(step)
        stopping = step < until and any_process(loop.stop.received is not None, loop.comm)
        if step < until and (step % engine.resume_every == 0 or stopping):
            save_resume_state(
                loop.resume_state,
                loop.identity,
                trainer.objective,
                trainer.optimizer,
                progress,
                loop.device,
                processes,
            )
        if stopping:
            number = loop.stop.received or signal.SIGTERM
            if processes.is_main:
                log(f"{name}: stopped by signal {number} at step {step}; rerun to resume")
            raise SystemExit(128 + number)
