"""Train stage of a trunk (train.schedule wsd): one size's shared constant-learning-rate stretch.

Every warmup-stable-decay run of a (dataset, size) is, up to its branch point, the same
computation: the same initial weights, the same batches (step k's batch is a function of k)
and the same learning rate (warmup, then the peak). The trunk trains it once and keeps the full
training state (weights, optimizer, RNG, the curve so far: a resume state) at each run's
branch point, in its states folder; each run's own job (``workflow.train`` with a cooldown)
loads its branch state and decays from there.

The trunk's identity is its ``TrunkSpec``, which leaves out how far it trains: the branch
points are an extension. A run added later (a new multiplier) finds no state at its branch
point, and its job grows the trunk to it (``branch``), resuming from the nearest state before
it, never from step 0 when a state before it is kept. A trunk of another spec (a size's
hyperparameters changed) finds the folder's states stale, empties it and starts over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workflow.atomic import atomic_path, write_json
from workflow.device import configure, peak_tflops, resolve_device
from workflow.distributed import (
    Processes,
    barrier,
    communication,
    processes_from_environment,
)
from workflow.errors import TrainError
from workflow.integrity import DamagedOutputError, remove_stale_temporaries
from workflow.loop import Loop, advance, check_data
from workflow.paths import (
    lock_file,
    resume_state_file,
    trunk_spec_file,
    trunk_state_path,
    trunk_state_steps,
)
from workflow.resume import (
    RESUME_FORMAT,
    StopSignals,
    clear_work,
    exclusive_work,
    load_state,
    restore_state,
    save_resume_state,
    spec_hash,
)
from workflow.settings import Cooldown, EngineSettings, SettingsError, TrunkSpec
from workflow.shards import TokenShards
from workflow.step import seeded_trainer, trunk_learning_rate
from workflow.telemetry import Progress, format_duration, log


@dataclass(frozen=True)
class TrunkStates:
    """A trunk's states folder, and the branch points (of every run of the trunk) that the
    job knows of: growing the trunk, it keeps a state at each one it passes."""

    directory: Path
    branch_steps: tuple[int, ...]

    @property
    def lock(self) -> Path:
        return lock_file(self.directory)

    @property
    def spec_file(self) -> Path:
        """The ``TrunkSpec`` the states belong to."""
        return trunk_spec_file(self.directory)

    @property
    def resume_state(self) -> Path:
        """Where a trunk stopped between branch points continues from."""
        return resume_state_file(self.directory)

    def state(self, step: int) -> Path:
        return Path(trunk_state_path(self.directory, step))


def adopt(states: TrunkStates, spec: TrunkSpec, processes: Processes) -> None:
    """Make the folder the states of ``spec``: emptied (all but the lock) if they belong to
    another spec. Rank 0 changes it, under the trunk's lock; the others wait."""
    if processes.is_main:
        steps = {*states.branch_steps, *trunk_state_steps(states.directory)}
        for final in (states.spec_file, states.resume_state, *map(states.state, steps)):
            remove_stale_temporaries(final)
        recorded = states.spec_file.read_text() if states.spec_file.exists() else None
        if recorded != spec.to_json():
            if recorded is not None:
                log(f"{spec.run}: discarding the states of another trunk spec ({states.directory})")
            clear_work(states.directory, states.lock)
            with atomic_path(states.spec_file) as temporary:
                temporary.write_text(spec.to_json())
    barrier(processes)


def nearest_state(states: TrunkStates, step: int) -> tuple[int, Path | None]:
    """The kept state with the most steps, at most ``step``: (0, None) if there is none."""
    kept = [(saved, states.state(saved)) for saved in trunk_state_steps(states.directory)]
    if states.resume_state.exists():
        resumed = load_state(states.resume_state, lazily=True)["progress"]["step"]
        kept.append((resumed, states.resume_state))
    earlier = [entry for entry in kept if entry[0] <= step]
    return max(earlier, key=lambda entry: entry[0], default=(0, None))


def restore(loop: Loop, path: Path, step: int | None = None) -> Progress:
    """Load the trunk state at ``path`` into the loop's trainer; its progress."""
    state = load_state(path)
    name = loop.spec.run
    if state.get("format") != RESUME_FORMAT or state["spec_hash"] != loop.identity:
        raise DamagedOutputError(
            f"{name}: the trunk state {path} belongs to another trunk spec; delete "
            f"{path.parent} and re-run snakemake to train the trunk again"
        )
    if step is not None and state["progress"]["step"] != step:
        raise DamagedOutputError(
            f"{name}: the trunk state {path} is at step {state['progress']['step']}, not {step}"
        )
    restore_state(loop.trainer.objective, loop.trainer.optimizer, state)
    return Progress(state["progress"], loop.device, loop.comm.processes)


def reach(loop: Loop, states: TrunkStates, targets: Sequence[int]) -> list[list[int]]:
    """Keep the trunk's state at every step of ``targets``, training what is missing from
    the nearest kept state before it; the stretches trained, as [from, to] steps.

    Every process calls it, after ``adopt`` and under the trunk's lock. The loop's trainer is
    freshly built, or holds no state the trunk needs: it is overwritten by a kept state, or
    trained from its initial weights when none is kept before the first target.
    """
    processes = loop.comm.processes
    missing = [step for step in sorted(set(targets)) if not states.state(step).exists()]
    progress, trained = None, []
    for target in missing:
        start, path = nearest_state(states, target)
        if path is not None and (progress is None or start > progress.step):
            progress = restore(loop, path)
        elif progress is None:
            progress = Progress(None, loop.device, processes)
        if processes.is_main:
            log(f"{loop.spec.run}: training from step {progress.step} to step {target}")
        if trained and trained[-1][1] == progress.step:
            trained[-1][1] = target
        else:
            trained.append([progress.step, target])
        advance(
            loop,
            progress,
            target,
            lambda step: trunk_learning_rate(step, loop.spec.lr, loop.spec.warmup),
            lambda step: None,
        )
        save_resume_state(
            states.state(target),
            loop.identity,
            loop.trainer.objective,
            loop.trainer.optimizer,
            progress,
            loop.device,
            processes,
        )
    if processes.is_main and states.resume_state.exists():
        saved = load_state(states.resume_state, lazily=True)["progress"]["step"]
        if saved <= max(trunk_state_steps(states.directory), default=-1):
            states.resume_state.unlink()  # a kept branch state is at least as far
    return trained


def trunk_loop(spec: TrunkSpec, engine, shards, trainer, comm, device, states, stop) -> Loop:
    """The loop that grows the trunk of ``spec``, kept in ``states``."""
    return Loop(
        spec=spec,
        engine=engine,
        shards=shards,
        trainer=trainer,
        comm=comm,
        device=device,
        peak=peak_tflops(device, engine.peak_tflops),
        tokens=max(states.branch_steps) * spec.tokens_per_step,
        last_step=None,
        resume_state=states.resume_state,
        identity=spec_hash(spec),
        stop=stop,
    )


def branch(run_loop: Loop, cooldown: Cooldown, states: TrunkStates) -> Progress:
    """A warmup-stable-decay run's progress at its branch point, loaded from its trunk's
    state there into the run's freshly built trainer; the trunk is grown to it first if it
    stops short (a run added after its trunk ran), waiting for another run's job that grows
    it meanwhile."""
    spec = TrunkSpec.of_run(run_loop.spec, cooldown.trunk)
    known = tuple(sorted({*states.branch_steps, cooldown.branch_step}))
    states = TrunkStates(states.directory, known)
    loop = trunk_loop(
        spec,
        run_loop.engine,
        run_loop.shards,
        run_loop.trainer,
        run_loop.comm,
        run_loop.device,
        states,
        run_loop.stop,
    )
    with exclusive_work(states.lock, spec.run, run_loop.comm, wait=True):
        adopt(states, spec, run_loop.comm.processes)
        reach(loop, states, [step for step in known if step <= cooldown.branch_step])
        progress = restore(loop, states.state(cooldown.branch_step), cooldown.branch_step)
    if run_loop.comm.processes.is_main:
        log(
            f"{run_loop.spec.run}: branching from {spec.run} at step {cooldown.branch_step} "
            f"({states.state(cooldown.branch_step)}), decaying ({cooldown.decay}) from there"
        )
    return progress


def grow(
    spec: TrunkSpec,
    engine: EngineSettings,
    data_dir: Path,
    states: TrunkStates,
    summary_path: Path,
    threads: int,
) -> dict:
    """Keep the trunk's state at each of ``states.branch_steps``, training what is missing;
    write and return the summary. Under torchrun every process calls this."""
    processes = processes_from_environment()
    device = resolve_device(spec.device, processes.local_rank)
    with communication(processes, device) as comm:
        return grow_joined(spec, engine, data_dir, states, summary_path, threads, device, comm)


def grow_joined(spec, engine, data_dir, states, summary_path, threads, device, comm) -> dict:
    """``grow`` once the processes have joined (``comm``)."""
    processes = comm.processes
    configure(device, threads)
    shards = TokenShards(data_dir)
    check_data(spec, max(states.branch_steps) * spec.tokens_per_step, shards, engine, processes)
    if processes.is_main:
        remove_stale_temporaries(summary_path)
    with exclusive_work(states.lock, spec.run, comm), StopSignals() as stop:
        adopt(states, spec, processes)
        trainer = seeded_trainer(spec, engine, device, processes)
        loop = trunk_loop(spec, engine, shards, trainer, comm, device, states, stop)
        if processes.is_main:
            log(
                f"{spec.run}: {spec.n_params:,} parameters, branch points "
                f"{list(states.branch_steps)} of {spec.tokens_per_step:,} tokens on "
                f"{processes.world_size} x {device.type} (threads={threads})"
            )
        started = time.perf_counter()
        trained = reach(loop, states, states.branch_steps)
    summary = {
        "trunk": spec.trunk,
        "spec_hash": loop.identity,
        "branch_steps": list(states.branch_steps),
        "steps": max(states.branch_steps),
        "tokens": max(states.branch_steps) * spec.tokens_per_step,
        "trained_steps": trained,
        "trained_tokens": sum(end - start for start, end in trained) * spec.tokens_per_step,
        "job_wall_s": time.perf_counter() - started,
        "states": str(states.directory),
    }
    if processes.is_main:
        write_json(summary_path, summary)
        what = ", ".join(f"steps {start}-{end}" for start, end in trained) or "nothing"
        log(f"{spec.run}: done, trained {what} in {format_duration(summary['job_wall_s'])}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the trunk's TrunkSpec as one JSON object")
    parser.add_argument(
        "--branch-steps", required=True, help="JSON list of the steps to keep a state at"
    )
    parser.add_argument("--engine", required=True, help="EngineSettings as one JSON object")
    parser.add_argument("--threads", type=int, required=True, help="CPU threads per process")
    parser.add_argument("--data", required=True, help="token shard directory of the train split")
    parser.add_argument("--states", required=True, help="the trunk's states folder")
    parser.add_argument("--summary", required=True, help="the trunk's summary (JSON) to write")
    args = parser.parse_args(argv)
    try:
        spec = TrunkSpec.from_json(args.spec)
        engine = EngineSettings.from_json(args.engine)
        branch_steps = tuple(sorted(set(json.loads(args.branch_steps))))
    except (SettingsError, json.JSONDecodeError) as error:
        parser.error(str(error))
    states = TrunkStates(Path(args.states), branch_steps)
    try:
        grow(spec, engine, Path(args.data), states, Path(args.summary), args.threads)
    except (TrainError, DamagedOutputError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
