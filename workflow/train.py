"""Train stage: one model on exactly D = M x N tokens, resumable, outputs only when finished.

The paper's recipe (open_lm): AdamW (beta2 0.95, eps 1e-8, weight decay on every parameter,
norm gains and embeddings included), linear warmup then cosine decay to ``min_lr`` at the last
step, gradient clipping at ``grad_clip``, and a z-loss ``z_loss * logsumexp(logits)^2`` in the
objective (``workflow.model.OutputLoss``; the logged loss is the plain cross-entropy). bf16
autocast on CUDA, fp32 on CPU. The run comes as a ``RunSpec`` (``spec``: what determines its
result) and ``EngineSettings`` (``engine``: speed, memory, how often to save a resume state).

Under ``torchrun`` the run is data-parallel (``workflow.distributed``): each process reads a
disjoint slice of every global batch, gradients are summed, and only rank 0 logs and writes.
Exactly D ids are predicted, each once, in stream order (``workflow.shards.read_batch``), so a
step's data is a function of its number: that makes resuming exact (``workflow.resume``).
While training, the work folder holds the checkpoints so far and the resume state; the
checkpoints, the curve and the summary appear only when the run has finished.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from workflow.atomic import atomic_path, write_json
from workflow.device import peak_tflops, resolve_device, to_device
from workflow.distributed import (
    PARALLELISMS,
    Communication,
    Processes,
    any_process,
    barrier,
    communication,
    gradient_sync,
    processes_from_environment,
    wrap,
)
from workflow.errors import TrainError
from workflow.model import ScalingLM, TrainingObjective, build_model
from workflow.paths import checkpoint_path
from workflow.resume import (
    FULL_STATE,
    StopSignals,
    load_resume_state,
    restore_state,
    save_resume_state,
    spec_hash,
)
from workflow.settings import EngineSettings, RunSpec, SettingsError
from workflow.shards import TokenShards, read_batch
from workflow.telemetry import Progress, curve_row, format_duration, format_row, log


@dataclass(frozen=True)
class Outputs:
    """Where the run's files go, as the rule names them; ``work`` only until it finishes."""

    checkpoints: Path
    curve: Path
    summary: Path
    work: Path

    @property
    def resume_state(self) -> Path:
        return self.work / "resume.pt"

    @property
    def unfinished_checkpoints(self) -> Path:
        return self.work / "checkpoints"


@dataclass
class Batch:
    """This process's sequences of one optimizer step.

    ``targets`` is IGNORE_INDEX past the run's last token; ``n_targets`` counts the targets of
    the whole step, over all processes.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    n_targets: int


@dataclass
class StepSettings:
    """What ``train_step`` needs besides the model, the optimizer and the batch."""

    micro_batch_size: int
    grad_clip: float
    device: torch.device
    world_size: int = 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None


def learning_rate(step: int, steps: int, peak: float, warmup: int, minimum: float) -> float:
    """Learning rate of the update that completes optimizer step ``step`` (1-based).

    Linear warmup from 0 reaches ``peak`` at step ``warmup``; a cosine then decays it to
    ``minimum`` exactly at the last step.
    """
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))


def train_step(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    lr: float,
    settings: StepSettings,
) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the sum of this process's cross-entropies.

    ``objective`` is a ``TrainingObjective``, wrapped for data parallelism or not. Gradients
    of the micro-batches accumulate with each one's objective divided by the whole step's
    target count, so the step minimises the mean over all its targets whatever the
    micro-batching, the number of processes and however short the last batch; the factor
    ``world_size`` undoes the averaging of the gradient all-reduce, which should be a sum.
    Only the last micro-batch's backward all-reduces. Nothing here waits for the device.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    scale = settings.world_size / batch.n_targets
    cross_entropy_sum = torch.zeros((), device=settings.device)
    n_sequences = len(batch.inputs)
    for begin in range(0, n_sequences, settings.micro_batch_size):
        end = begin + settings.micro_batch_size
        with gradient_sync(objective, enabled=end >= n_sequences):
            with torch.autocast(
                settings.device.type,
                dtype=settings.autocast_dtype,
                enabled=settings.autocast_dtype is not None,
            ):
                objective_sum, cross_entropy = objective(
                    batch.inputs[begin:end], batch.targets[begin:end]
                )
            (objective_sum * scale).backward()
        cross_entropy_sum += cross_entropy
    torch.nn.utils.clip_grad_norm_(objective.parameters(), settings.grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cross_entropy_sum


def make_optimizer(model: nn.Module, spec: RunSpec, device: torch.device) -> torch.optim.AdamW:
    """PyTorch AdamW (decay scaled by the current lr) over all parameters, as open_lm.

    Fused (one kernel for every parameter) on CUDA; on CPU the default foreach version.
    """
    return torch.optim.AdamW(
        model.parameters(),
        lr=spec.lr,
        betas=(spec.beta1, spec.beta2),
        eps=1e-8,
        weight_decay=spec.weight_decay,
        fused=device.type == "cuda",
    )


def check_run(
    spec: RunSpec, engine: EngineSettings, shards: TokenShards, processes: Processes
) -> None:
    """Refuse, before building anything, a run whose numbers do not add up."""
    run = spec.run
    if spec.steps != spec.checkpoint_steps[-1]:
        raise TrainError(
            f"{run}: {spec.tokens:,} tokens at {spec.batch_size} x "
            f"{spec.shape['context_length']} tokens per step take {spec.steps} steps, but the "
            f"last checkpoint step is {spec.checkpoint_steps[-1]}"
        )
    needed = spec.tokens + 1
    if shards.n_tokens < needed:
        raise TrainError(
            f"{run}: needs {needed:,} tokens of {shards.directory} (D = {spec.tokens:,} "
            f"targets plus the first input) but it holds {shards.n_tokens:,}; short by "
            f"{needed - shards.n_tokens:,}. Train on more data or lower the multiplier."
        )
    if shards.vocab_size > spec.shape["vocab_size"]:
        raise TrainError(
            f"{run}: the token ids of {shards.directory} come from a vocabulary of "
            f"{shards.vocab_size}, larger than the model's vocab_size "
            f"{spec.shape['vocab_size']}"
        )
    if spec.batch_size % processes.world_size:
        raise TrainError(
            f"{run}: a batch of {spec.batch_size} sequences does not split evenly over "
            f"{processes.world_size} processes; use a batch size divisible by the GPU count"
        )
    if engine.parallelism not in PARALLELISMS:
        raise TrainError(f"{run}: parallelism must be one of {PARALLELISMS}")


@dataclass
class Trainer:
    """What a run's steps run on: the model, the objective ``train_step`` calls (the model's
    ``TrainingObjective``, wrapped for data parallelism), its optimizer and step settings."""

    model: ScalingLM
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    settings: StepSettings


def build_trainer(
    spec: RunSpec, engine: EngineSettings, device: torch.device, processes: Processes
) -> Trainer:
    """The model (initialised from the global RNG), wrapped for ``processes``, and its optimizer.

    The benchmark builds its trainer here too, so it times exactly the pipeline's step.
    """
    model = build_model(spec.shape)
    n_params = sum(parameter.numel() for parameter in model.parameters())
    if n_params != spec.n_params:
        raise TrainError(
            f"{spec.run}: the model of shape {spec.shape} has {n_params:,} parameters "
            f"but the spec says n_params = {spec.n_params:,}; "
            "workflow.runs.count_parameters and workflow.model disagree"
        )
    model.set_activation_checkpointing(engine.activation_checkpointing)
    model.to(device)
    if engine.compile:
        model.compile_blocks()
    objective = wrap(
        TrainingObjective(model, spec.z_loss), model.blocks, processes, engine.parallelism
    )
    settings = StepSettings(
        # Unset, a forward pass takes this process's whole share of the batch.
        micro_batch_size=spec.micro_batch_size or spec.batch_size // processes.world_size,
        grad_clip=spec.grad_clip,
        device=device,
        world_size=processes.world_size,
    )
    return Trainer(model, objective, make_optimizer(objective, spec, device), settings)


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
) -> dict:
    """Run (or resume) the training ``spec`` describes; return the summary it writes.

    ``threads`` is each process's CPU threads on CPU. Under torchrun every process calls
    this; they join each other here.
    """
    processes = processes_from_environment()
    device = resolve_device(spec.device, processes.local_rank)
    with communication(processes, device) as comm:
        return run_training(
            spec, engine, Path(data_dir), Path(tokenizer_dir), outputs, threads, device, comm
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
) -> dict:
    """``train`` once the processes have joined (``comm``); only rank 0 writes."""
    run, processes = spec.run, comm.processes
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    transformers_logging.disable_progress_bar()

    steps, context_length = spec.steps, spec.shape["context_length"]
    shards = TokenShards(data_dir)
    check_run(spec, engine, shards, processes)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    trainer = build_trainer(spec, engine, device, processes)
    peak = peak_tflops(device, engine.peak_tflops)

    identity = spec_hash(spec)
    state = load_resume_state(outputs.resume_state, identity, outputs.unfinished_checkpoints, spec)
    barrier(processes)  # every process has read the state before rank 0 may remove it
    if state is None:
        if processes.is_main:
            shutil.rmtree(outputs.work, ignore_errors=True)
            outputs.work.mkdir(parents=True)
        progress = Progress(None, device, processes)
    else:
        restore_state(trainer.objective, trainer.optimizer, state)
        progress = Progress(state["progress"], device, processes)
        if processes.is_main:
            log(f"{run}: resuming at step {progress.step}/{steps} from {outputs.resume_state}")
    if processes.is_main:
        sharing = f" ({engine.parallelism})" if processes.distributed else ""
        log(
            f"{run}: {spec.n_params:,} parameters, {spec.tokens:,} tokens in {steps} steps of "
            f"{spec.tokens_per_step:,} on {processes.world_size} x {device.type}{sharing} "
            f"(threads={threads})"
        )

    trainer.objective.train()
    with StopSignals() as stop:
        while progress.step < steps:
            inputs, targets, n_targets = read_batch(
                shards, progress.step, spec.batch_size, context_length, spec.tokens, processes
            )
            batch = Batch(to_device(inputs, device), to_device(targets, device), n_targets)
            lr = learning_rate(progress.step + 1, steps, spec.lr, spec.warmup, spec.min_lr)
            progress.loss_sum += train_step(
                trainer.objective, trainer.optimizer, batch, lr, trainer.settings
            )
            progress.step += 1
            progress.timed_tokens += n_targets
            step = progress.step

            if step % spec.log_every == 0 or step == steps:
                row = curve_row(progress, spec, lr, peak)
                progress.curve.append(row)
                if processes.is_main:
                    log(format_row(row, steps, spec.tokens))
            if step in spec.checkpoint_steps:
                directory = checkpoint_path(outputs.unfinished_checkpoints, step)
                save_checkpoint(directory, trainer, tokenizer, processes)
            stopping = step < steps and any_process(stop.received is not None, comm)
            if step < steps and (step % engine.resume_every == 0 or stopping):
                save_resume_state(
                    outputs.resume_state,
                    identity,
                    trainer.objective,
                    trainer.optimizer,
                    progress,
                    device,
                    processes,
                )
            if stopping:
                number = stop.received or signal.SIGTERM
                if processes.is_main:
                    log(f"{run}: stopped by signal {number} at step {step}; rerun to resume")
                raise SystemExit(128 + number)

    wall_seconds = progress.elapsed()
    summary = {
        "run": run,
        "n_params": spec.n_params,
        "tokens": spec.tokens,
        "steps": steps,
        "tokens_per_step": spec.tokens_per_step,
        "final_loss": progress.curve[-1]["loss"],
        "wall_s": wall_seconds,
        "tokens_per_s": spec.tokens / wall_seconds,
        "processes": processes.world_size,
        "device": str(device.type),
        "threads": threads if device.type == "cpu" else None,
        "spec_hash": identity,
    }
    if processes.is_main:
        # The checkpoints leave the work folder last: until they do, a kill leaves the resume
        # state and its checkpoints together, and the re-run resumes instead of starting over.
        with atomic_path(outputs.curve) as temporary:
            pd.DataFrame(progress.curve).to_parquet(temporary, index=False)
        write_json(outputs.summary, summary)
        with atomic_path(outputs.checkpoints) as temporary:
            os.replace(outputs.unfinished_checkpoints, temporary)
        shutil.rmtree(outputs.work)
        log(
            f"{run}: done, final loss {summary['final_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s over {format_duration(wall_seconds)}"
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the run's RunSpec as one JSON object")
    parser.add_argument(
        "--engine",
        required=True,
        help="the run's EngineSettings as one JSON object: speed and memory settings that "
        "leave the result alone",
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
    args = parser.parse_args(argv)
    try:
        spec = RunSpec.from_json(args.spec)
        engine = EngineSettings.from_json(args.engine)
    except SettingsError as error:
        parser.error(str(error))
    outputs = Outputs(Path(args.checkpoints), Path(args.curve), Path(args.summary), Path(args.work))
    try:
        train(spec, engine, args.data, args.tokenizer, outputs, args.threads)
    except TrainError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
