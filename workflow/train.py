"""Train stage: one model on exactly D = M x N tokens, resumable, outputs only when finished.

The run comes as a ``RunSpec`` (``spec``: what determines its result) and ``EngineSettings``
(``engine``: speed, memory, how often to log and to save a resume state). One optimizer
step, with the paper's recipe, is ``workflow.step``'s; this module builds the trainer, runs
the loop and saves, in that order, as nanoGPT's train.py does.

Under ``torchrun`` the run is data-parallel (``workflow.distributed``): each process reads a
disjoint slice of every global batch, gradients are summed, and only rank 0 logs and writes.
Exactly D ids are predicted, each once, in the spec's data order (``workflow.shards``), so a
step's data is a function of its number: that makes resuming exact (``workflow.resume``).
While training, the work folder holds the checkpoints so far, the resume state and a lock
that keeps a second trainer of the run out; the checkpoints, the curve and the summary
appear only when the run has finished. A loss that turns non-finite stops the run; one that
ends well above its lowest marks the run as diverged (``workflow.telemetry.divergence``) in
its log and its summary.

Under train.schedule wsd a run is a cooldown: it starts from its size's trunk
(``workflow.trunk``) at its branch point, with the trunk's state there (weights, optimizer,
curve so far), and decays to its own end; it computes exactly what the same run trained alone
on that schedule would. The step loop itself is ``workflow.loop``'s, shared with the trunk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from workflow.atomic import atomic_path, write_json
from workflow.device import configure, peak_tflops, resolve_device
from workflow.distributed import (
    Communication,
    Processes,
    barrier,
    communication,
    processes_from_environment,
)
from workflow.errors import TrainError
from workflow.integrity import DamagedOutputError, remove_stale_temporaries
from workflow.loop import Loop, advance, check_data
from workflow.paths import (
    checkpoint_path,
    lock_file,
    resume_state_file,
    unfinished_checkpoints,
)
from workflow.resume import (
    FULL_STATE,
    StopSignals,
    clear_work,
    exclusive_work,
    load_resume_state,
    missing_checkpoints,
    restore_state,
    spec_hash,
)
from workflow.settings import Cooldown, EngineSettings, RunSpec, SettingsError
from workflow.shards import TokenShards
from workflow.step import Trainer, schedule, seeded_trainer
from workflow.telemetry import Progress, format_duration, log, run_summary
from workflow.trunk import TrunkStates, branch


@dataclass(frozen=True)
class Outputs:
    """Where the run's files go, as the rule names them; ``work`` only until it finishes."""

    checkpoints: Path
    curve: Path
    summary: Path
    work: Path

    @property
    def resume_state(self) -> Path:
        return resume_state_file(self.work)

    @property
    def unfinished_checkpoints(self) -> Path:
        return unfinished_checkpoints(self.work)

    @property
    def lock(self) -> Path:
        """Held by the run's one trainer (``workflow.resume.exclusive_work``)."""
        return lock_file(self.work)


def check_run(
    spec: RunSpec, engine: EngineSettings, shards: TokenShards, processes: Processes
) -> None:
    """Refuse, before building anything, a run whose numbers do not add up."""
    if spec.steps != spec.checkpoint_steps[-1]:
        raise TrainError(
            f"{spec.run}: {spec.tokens:,} tokens at {spec.batch_size} x "
            f"{spec.shape['context_length']} tokens per step take {spec.steps} steps, but the "
            f"last checkpoint step is {spec.checkpoint_steps[-1]}"
        )
    check_data(spec, spec.tokens, shards, engine, processes)


def save_checkpoint(
    directory: str | Path,
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    processes: Processes,
) -> None:
    """A ``save_pretrained`` checkpoint of the whole model, written by rank 0."""
    weights = get_model_state_dict(trainer.objective, options=FULL_STATE)
    if processes.is_main:
        weights = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
        with atomic_path(directory) as temporary:
            trainer.model.save_pretrained(temporary, state_dict=weights)
            tokenizer.save_pretrained(temporary)


def train(
    spec: RunSpec,
    engine: EngineSettings,
    data_dir: str | Path,
    tokenizer_dir: str | Path,
    outputs: Outputs,
    threads: int,
    cooldown: Cooldown | None = None,
    trunk: TrunkStates | None = None,
) -> dict:
    """Run (or resume) the training ``spec`` describes; return the summary it writes.

    ``threads`` is each process's CPU threads on CPU. A warmup-stable-decay run has a
    ``cooldown`` and starts from its ``trunk``'s state at its branch point (without a trunk it
    trains that part itself). Under torchrun every process calls this; they join each other
    here.
    """
    processes = processes_from_environment()
    device = resolve_device(spec.device, processes.local_rank)
    with communication(processes, device) as comm:
        return run_training(
            spec,
            engine,
            Path(data_dir),
            Path(tokenizer_dir),
            outputs,
            threads,
            device,
            comm,
            cooldown,
            trunk,
        )


def run_training(
    spec: RunSpec,
    engine: EngineSettings,
    data_dir: Path,
    tokenizer_dir: Path,
    outputs: Outputs,
    threads: int,
    device: torch.device,
    comm: Communication,
    cooldown: Cooldown | None = None,
    trunk: TrunkStates | None = None,
) -> dict:
    """``train`` once the processes have joined (``comm``): build, loop, save."""
    run, processes = spec.run, comm.processes
    configure(device, threads)
    transformers_logging.disable_progress_bar()

    steps = spec.steps
    shards = TokenShards(data_dir)
    check_run(spec, engine, shards, processes)
    with exclusive_work(outputs.lock, run, comm), StopSignals() as stop:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        trainer = seeded_trainer(spec, engine, device, processes)
        identity = spec_hash(spec, cooldown)
        loop = Loop(
            spec=spec,
            engine=engine,
            shards=shards,
            trainer=trainer,
            comm=comm,
            device=device,
            peak=peak_tflops(device, engine.peak_tflops),
            tokens=spec.tokens,
            last_step=steps,
            resume_state=outputs.resume_state,
            identity=identity,
            stop=stop,
        )
        progress = start_or_resume(spec, outputs, trainer, identity, device, processes)
        if progress.step == 0 and cooldown is not None and trunk is not None:
            progress = branch(loop, cooldown, trunk)
        if processes.is_main:
            sharing = f" ({engine.parallelism})" if processes.distributed else ""
            log(
                f"{run}: {spec.n_params:,} parameters, {spec.tokens:,} tokens in {steps} steps "
                f"of {spec.tokens_per_step:,} on {processes.world_size} x {device.type}{sharing} "
                f"(threads={threads})"
            )

        def save_checkpoints(step: int) -> None:
            if step in spec.checkpoint_steps:
                directory = checkpoint_path(outputs.unfinished_checkpoints, step)
                save_checkpoint(directory, trainer, tokenizer, processes)

        advance(loop, progress, steps, schedule(spec, cooldown), save_checkpoints)
        summary = run_summary(spec, progress, identity, device, threads, cooldown)
        if processes.is_main:
            publish(spec, outputs, progress, summary)
        return summary


def start_or_resume(
    spec: RunSpec,
    outputs: Outputs,
    trainer: Trainer,
    identity: str,
    device: torch.device,
    processes: Processes,
) -> Progress:
    """The run's progress, restored from its resume state if it has a valid one; otherwise
    a fresh start in an emptied work folder. First, rank 0 removes what a killed trainer
    left half-written."""
    if processes.is_main:
        for final in (outputs.checkpoints, outputs.curve, outputs.summary, outputs.resume_state):
            remove_stale_temporaries(final)
        for step in spec.checkpoint_steps:
            remove_stale_temporaries(checkpoint_path(outputs.unfinished_checkpoints, step))
    state = load_resume_state(outputs.resume_state, identity, outputs.unfinished_checkpoints, spec)
    barrier(processes)  # every process has read the state before rank 0 may remove it
    if state is None:
        if processes.is_main:
            clear_work(outputs.work, outputs.lock)
        return Progress(None, device, processes)
    restore_state(trainer.objective, trainer.optimizer, state)
    progress = Progress(state["progress"], device, processes)
    if processes.is_main:
        log(
            f"{spec.run}: resuming at step {progress.step}/{spec.steps} from {outputs.resume_state}"
        )
    return progress


def publish(spec: RunSpec, outputs: Outputs, progress: Progress, summary: dict) -> None:
    """Move the finished run's outputs into place and remove its work folder (rank 0).

    The checkpoints leave the work folder last: until they do, a kill leaves the resume
    state and its checkpoints together, and the re-run resumes instead of starting over.
    """
    run = spec.run
    if summary["diverged"]:
        log(f"DIVERGED: {run}: {summary['divergence_reason']}")
    missing = missing_checkpoints(outputs.unfinished_checkpoints, spec.checkpoint_steps)
    if missing:
        raise TrainError(
            f"{run}: the checkpoints of steps {missing} are missing from "
            f"{outputs.unfinished_checkpoints}; an incomplete run is not published. Delete "
            f"{outputs.work} and re-run to train the run again."
        )
    with atomic_path(outputs.curve) as temporary:
        pd.DataFrame(progress.curve).to_parquet(temporary, index=False)
    write_json(outputs.summary, summary)
    with atomic_path(outputs.checkpoints) as temporary:
        os.replace(outputs.unfinished_checkpoints, temporary)
    shutil.rmtree(outputs.work)
    log(
        f"{run}: done, final loss {summary['final_loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s over {format_duration(summary['wall_s'])}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the run's RunSpec as one JSON object")
    parser.add_argument(
        "--engine",
        required=True,
        help="the run's EngineSettings as one JSON object: speed, memory and logging settings "
        "that leave the result alone",
    )
    parser.add_argument("--threads", type=int, required=True, help="CPU threads per process")
    parser.add_argument("--data", required=True, help="token shard directory of the train split")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--checkpoints", required=True, help="the finished run's checkpoints")
    parser.add_argument("--curve", required=True, help="the training curve (Parquet) to write")
    parser.add_argument("--summary", required=True, help="the run's summary (JSON) to write")
    parser.add_argument(
        "--work", required=True, help="where the unfinished run keeps its checkpoints and state"
    )
    parser.add_argument(
        "--cooldown",
        help="train.schedule wsd: the run's Cooldown as one JSON object (its branch point and "
        "decay); without it the run is cosine",
    )
    parser.add_argument(
        "--trunk-states", help="with --cooldown: the states folder of the run's trunk"
    )
    parser.add_argument(
        "--branch-steps",
        default="[]",
        help="with --trunk-states: JSON list of the branch points of the trunk's other runs, "
        "kept if this job has to grow the trunk",
    )
    args = parser.parse_args(argv)
    try:
        spec = RunSpec.from_json(args.spec)
        engine = EngineSettings.from_json(args.engine)
        cooldown = Cooldown.from_json(args.cooldown) if args.cooldown else None
        branch_steps = tuple(json.loads(args.branch_steps))
    except (SettingsError, json.JSONDecodeError) as error:
        parser.error(str(error))
    if args.trunk_states and cooldown is None:
        parser.error("--trunk-states needs --cooldown")
    trunk = TrunkStates(Path(args.trunk_states), branch_steps) if args.trunk_states else None
    outputs = Outputs(Path(args.checkpoints), Path(args.curve), Path(args.summary), Path(args.work))
    try:
        train(spec, engine, args.data, args.tokenizer, outputs, args.threads, cooldown, trunk)
    except (TrainError, DamagedOutputError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
