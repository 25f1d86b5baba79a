"""Train stage: one model on exactly D = M x N tokens, resumable, outputs only when finished.

The paper's recipe (open_lm): AdamW (beta2 0.95, eps 1e-8, weight decay on every parameter,
norm gains and embeddings included, as open_lm does), linear warmup then cosine decay to
``min_lr`` at the last step, gradient clipping at ``grad_clip``, and a z-loss
``z_loss * logsumexp(logits)^2`` added to the training objective (the logged loss is the plain
cross-entropy). bf16 autocast on CUDA, fp32 on CPU.

Under ``torchrun`` the run is data-parallel (``workflow.distributed``): every process reads a
disjoint slice of each global batch, gradients are summed across processes, and only rank 0
logs and writes files; the loss curve is the single-process one. Every ``log_every`` steps
the log and the curve get step, tokens, loss, lr, tokens/s and MFU (``flops_per_token``
against ``peak_tflops``); those are the only steps at which the host waits for the device.

Token accounting is exact and needs no state: sequence ``i`` is stream ids
``[i*T, i*T + T + 1)`` (inputs, then the same window shifted by one as targets), sequences are
consumed in order from the start of the stream, and the last sequence (and so the last batch)
is cut short so that exactly D ids are predicted, each once. A step's data is therefore a pure
function of the step number (and the process's rank), which is what makes resuming exact: the
resume state holds the weights, the optimizer's moments and step counts, the RNG states and the
curve so far, and a resumed run computes bit for bit what the uninterrupted one would have.

Layout of RUN_DIR while training: ``work/`` holds the checkpoints written so far and
``resume.pt``; ``checkpoints/``, ``curve.parquet`` and ``train.json`` (the Snakemake outputs)
appear only when the run has finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from workflow.atomic import atomic_path, write_json
from workflow.distributed import (
    PARALLELISMS,
    SINGLE_PROCESS,
    Communication,
    Processes,
    any_process,
    barrier,
    communication,
    gradient_sync,
    processes_from_environment,
    summed,
    wrap,
)
from workflow.model import ScalingLM, build_model
from workflow.shards import TokenShards

IGNORE_INDEX = -100
# Rows of logits the fused output loss materialises at once: about 4 MB of fp32 logits stays in
# a CPU's cache; on a GPU larger chunks only need to bound memory (V = 50k: 1,300 rows).
LOSS_CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}
# How a run is computed, not what: speed and memory settings and how often the resume state
# is written (``--engine``, default off / DDP). A run may resume under other values: the
# resume state holds whole, unsharded tensors.
# Defaults for a spec run by hand (``train`` and the benchmark fill them in); the pipeline
# passes every key from the config.
ENGINE_DEFAULTS = {
    "compile": False,
    "activation_checkpointing": False,
    "parallelism": "ddp",
    "peak_tflops": None,
    "resume_every": 100,
}
ENGINE_KEYS = tuple(ENGINE_DEFAULTS)
SPEC_KEYS_NOT_HASHED = ("threads", *ENGINE_KEYS)
# Dense bf16 peak TFLOP/s by GPU name (first match), for the MFU of the log when the spec
# gives no peak_tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


class TrainError(RuntimeError):
    """A run that cannot start as specified; the message names the run and the fix."""


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a spec's ``device`` names; process ``local_rank`` of a node gets that GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError("spec device is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Peak FLOP/s of one device for the MFU: as configured, or known by the GPU's name."""
    if configured or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(shape: dict, n_params: int) -> int:
    """Training FLOPs per token: 6N for the weights plus 12 L d T for attention's products."""
    return 6 * n_params + 12 * shape["n_layers"] * shape["d_model"] * shape["context_length"]


def spec_hash(spec: dict) -> str:
    """Identity of a spec for resuming: a resume state from another spec is stale."""
    kept = {key: value for key, value in spec.items() if key not in SPEC_KEYS_NOT_HASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def learning_rate(step: int, steps: int, peak: float, warmup: int, minimum: float) -> float:
    """Learning rate of the update that completes optimizer step ``step`` (1-based).

    Linear warmup from 0 reaches ``peak`` at step ``warmup``; a cosine then decays it to
    ``minimum`` exactly at the last step.
    """
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * progress))


def read_batch(
    shards: TokenShards,
    step_index: int,
    batch_size: int,
    context_length: int,
    tokens: int,
    processes: Processes = SINGLE_PROCESS,
) -> tuple[np.ndarray, np.ndarray, int]:
    """This process's inputs and targets ((sequences, T) int64) of 0-based step ``step_index``,
    and the step's target count over all processes.

    The step predicts stream ids ``start+1 .. start+n`` with ``start = step_index*B*T``, as
    B sequences of T; process r of W takes sequences ``[r*B/W, (r+1)*B/W)``, so the shares are
    disjoint and together exactly the step. In a short last step the unused positions of the
    last sequence get input 0 and target IGNORE_INDEX (causal attention keeps them from
    affecting the real positions); a process left with no sequence gets one of those only,
    which adds nothing to the gradient but lets it take part in the all-reduce.
    """
    tokens_per_step = batch_size * context_length
    start = step_index * tokens_per_step
    n_targets = min(tokens_per_step, tokens - start)
    share = tokens_per_step // processes.world_size
    offset = processes.rank * share
    n_local = max(0, min(share, n_targets - offset))
    n_sequences = max(1, math.ceil(n_local / context_length))
    inputs = np.zeros(n_sequences * context_length, dtype=np.int64)
    targets = np.full(n_sequences * context_length, IGNORE_INDEX, dtype=np.int64)
    if n_local:
        ids = shards.read(start + offset, n_local + 1)
        inputs[:n_local] = ids[:-1]
        targets[:n_local] = ids[1:]
    shape = (n_sequences, context_length)
    return inputs.reshape(shape), targets.reshape(shape), n_targets


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; to a GPU through pinned memory, without waiting for it."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class OutputLoss(torch.autograd.Function):
    """Output layer, cross-entropy and z-loss in one pass over row chunks of the logits.

    For small models the (tokens x vocab) logits dominate a step: materialising them, then
    running logsumexp, its backward and the matmul backward each stream the whole array
    through memory. Here each chunk's logits are made, turned into its loss and its gradient
    ``softmax * (1 + 2 z lse) - onehot(target)`` while in cache, and multiplied back into the
    gradients of the hidden states and of the output weight, all in the forward pass; the
    backward only scales them. On this project's 2-core CPU the loss part of a step got 2-3x
    faster than autograd over ``F.cross_entropy(logits) + z * logsumexp(logits)^2`` (d_model
    64, vocab 1024, 4096 tokens), and GPU memory no longer holds the whole logits array.
    Training only: the gradients are computed even under ``torch.no_grad``.

    Returns (objective, cross_entropy), both summed over the target positions that are not
    IGNORE_INDEX: objective = sum(ce + z * lse^2) is what to differentiate; the plain
    cross-entropy is for logging and carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss, chunk_rows):
        ctx.hidden_shape = hidden.shape
        hidden = hidden.flatten(0, -2)
        targets = targets.flatten()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        objective = hidden.new_zeros((), dtype=torch.float32)
        cross_entropy = hidden.new_zeros((), dtype=torch.float32)
        for begin in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[begin : begin + chunk_rows]
            chunk_targets = targets[begin : begin + chunk_rows]
            counted = (chunk_targets != IGNORE_INDEX).float()
            target_index = chunk_targets.clamp(min=0)[:, None]
            logits = (rows @ weight.T).float()
            probs = torch.softmax(logits, dim=-1)
            # lse from the largest probability (>= 1/V, so its log is exact): saves a pass.
            lse = logits.amax(dim=-1) - probs.amax(dim=-1).log()
            token_ce = lse - logits.gather(-1, target_index).squeeze(-1)
            cross_entropy += (token_ce * counted).sum()
            objective += ((token_ce + z_loss * lse.square()) * counted).sum()
            probs.mul_((counted * (1 + 2 * z_loss * lse))[:, None])
            probs.scatter_add_(-1, target_index, -counted[:, None])
            grad_hidden[begin : begin + chunk_rows] = probs @ weight
            grad_weight += probs.T @ rows
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(cross_entropy)
        return objective, cross_entropy

    @staticmethod
    def backward(ctx, grad_objective, _grad_cross_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_objective).view(ctx.hidden_shape),
            grad_weight * grad_objective,
            None,
            None,
            None,
        )


def output_loss(
    model: ScalingLM, hidden: torch.Tensor, targets: torch.Tensor, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``OutputLoss`` of ``model``'s output layer, chunked for the hidden states' device."""
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS[hidden.device.type] // model.config.vocab_size)
    return OutputLoss.apply(hidden, model.lm_head.weight, targets, z_loss, chunk_rows)


class TrainingObjective(nn.Module):
    """The model and its fused output loss behind one ``forward``, which is what gets wrapped.

    DDP prepares its gradient all-reduce and FSDP gathers the parameters in a module's
    ``forward``; the output loss reads the output layer's weight directly, so it has to run
    inside that ``forward`` too. Returns ``OutputLoss``'s (objective, cross_entropy) sums.
    """

    def __init__(self, model: ScalingLM, z_loss: float):
        super().__init__()
        self.model = model
        self.z_loss = z_loss

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.final_hidden_states(inputs)
        return output_loss(self.model, hidden, targets, self.z_loss)


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


def make_optimizer(model: nn.Module, spec: dict, device: torch.device) -> torch.optim.AdamW:
    """PyTorch AdamW (decay scaled by the current lr) over all parameters, as open_lm.

    Fused (one kernel for every parameter) on CUDA; on CPU the default foreach version.
    """
    return torch.optim.AdamW(
        model.parameters(),
        lr=spec["lr"],
        betas=(spec["beta1"], spec["beta2"]),
        eps=1e-8,
        weight_decay=spec["weight_decay"],
        fused=device.type == "cuda",
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def check_run(spec: dict, shards: TokenShards, steps: int, processes: Processes) -> None:
    """Refuse, before building anything, a run whose numbers do not add up."""
    run = spec["run"]
    if steps != spec["checkpoint_steps"][-1]:
        raise TrainError(
            f"{run}: {spec['tokens']:,} tokens at {spec['batch_size']} x "
            f"{spec['shape']['context_length']} tokens per step take {steps} steps, but the "
            f"last checkpoint step is {spec['checkpoint_steps'][-1]}"
        )
    needed = spec["tokens"] + 1
    if shards.n_tokens < needed:
        raise TrainError(
            f"{run}: needs {needed:,} tokens of {shards.directory} (D = {spec['tokens']:,} "
            f"targets plus the first input) but it holds {shards.n_tokens:,}; short by "
            f"{needed - shards.n_tokens:,}. Train on more data or lower the multiplier."
        )
    if shards.vocab_size > spec["shape"]["vocab_size"]:
        raise TrainError(
            f"{run}: the token ids of {shards.directory} come from a vocabulary of "
            f"{shards.vocab_size}, larger than the model's vocab_size "
            f"{spec['shape']['vocab_size']}"
        )
    if spec["batch_size"] % processes.world_size:
        raise TrainError(
            f"{run}: a batch of {spec['batch_size']} sequences does not split evenly over "
            f"{processes.world_size} processes; use a batch size divisible by the GPU count"
        )
    if spec["parallelism"] not in PARALLELISMS:
        raise TrainError(f"{run}: parallelism must be one of {PARALLELISMS}")


def check_parameter_count(spec: dict, model: ScalingLM) -> None:
    n_params = sum(parameter.numel() for parameter in model.parameters())
    if n_params != spec["n_params"]:
        raise TrainError(
            f"{spec['run']}: the model of shape {spec['shape']} has {n_params:,} parameters "
            f"but the spec says n_params = {spec['n_params']:,}; "
            "workflow.runs.count_parameters and workflow.model disagree"
        )


@dataclass
class Trainer:
    """What a spec's steps run on: the model, the objective ``train_step`` calls (the model's
    ``TrainingObjective``, wrapped for data parallelism), its optimizer and step settings."""

    model: ScalingLM
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    settings: StepSettings


def build_trainer(spec: dict, device: torch.device, processes: Processes) -> Trainer:
    """The model (initialised from the global RNG), wrapped for ``processes``, and its optimizer.

    The benchmark builds its trainer here too, so it times exactly the pipeline's step.
    """
    model = build_model(spec["shape"])
    check_parameter_count(spec, model)
    model.set_activation_checkpointing(spec["activation_checkpointing"])
    model.to(device)
    if spec["compile"]:
        model.compile_blocks()
    objective = wrap(
        TrainingObjective(model, spec["z_loss"]),
        model.blocks,
        processes,
        spec["parallelism"],
    )
    settings = StepSettings(
        micro_batch_size=spec.get("micro_batch_size") or spec["batch_size"] // processes.world_size,
        grad_clip=spec["grad_clip"],
        device=device,
        world_size=processes.world_size,
    )
    return Trainer(model, objective, make_optimizer(objective, spec, device), settings)


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


# Whole (unsharded) tensors on the host, keyed by parameter name: a state saved by one
# process loads into DDP or FSDP processes and back. Under FSDP only rank 0 gets them.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# The layout of resume.pt; a state of another layout (an older trainer's) is discarded.
RESUME_FORMAT = 2


def gathered_state(trainer: Trainer) -> tuple[dict, dict]:
    """Weights and optimizer state of the model; every process must call it (FSDP gathers)."""
    return get_state_dict(trainer.objective, trainer.optimizer, options=FULL_STATE)


def restore_state(trainer: Trainer, state: dict) -> None:
    set_state_dict(
        trainer.objective,
        trainer.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def load_resume_state(
    path: Path, expected_hash: str, checkpoint_dir: Path, spec: dict
) -> dict | None:
    """The saved state if it belongs to this spec and its checkpoints are all there."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != RESUME_FORMAT:
        log(f"{spec['run']}: discarding a resume state written by another trainer ({path})")
        return None
    if state["spec_hash"] != expected_hash:
        log(f"{spec['run']}: discarding the resume state of a different spec ({path})")
        return None
    missing = [
        step
        for step in spec["checkpoint_steps"]
        if step <= state["progress"]["step"] and not (checkpoint_dir / f"step{step:06d}").is_dir()
    ]
    if missing:
        log(f"{spec['run']}: discarding the resume state: checkpoints {missing} are missing")
        return None
    return state


def save_checkpoint(
    directory: Path, trainer: Trainer, tokenizer: PreTrainedTokenizerBase, processes: Processes
) -> None:
    """A ``save_pretrained`` checkpoint of the whole model, written by rank 0."""
    weights = get_model_state_dict(trainer.objective, options=FULL_STATE)
    if processes.is_main:
        weights = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
        with atomic_path(directory) as temporary:
            trainer.model.save_pretrained(temporary, state_dict=weights)
            tokenizer.save_pretrained(temporary)


class Progress:
    """What the loop carries from step to step, saved in and restored from a resume state.

    The curve's loss is the token-weighted mean over the steps since its previous row;
    ``loss_sum`` adds up this process's cross-entropies on the device (no host sync per step)
    and is summed over the processes only when a row is written or the state is saved.
    """

    def __init__(self, saved: dict | None, device: torch.device, processes: Processes):
        saved = saved or {"step": 0, "curve": [], "elapsed_s": 0.0, "loss_sum": 0.0}
        self.processes = processes
        self.step: int = saved["step"]
        self.curve: list[dict] = saved["curve"]
        self.elapsed_before = saved["elapsed_s"]
        # The saved sum is over all processes: rank 0 carries it on.
        self.loss_sum = torch.tensor(saved["loss_sum"] if processes.is_main else 0.0, device=device)
        self.started = self.timed_since = time.perf_counter()
        self.timed_tokens = 0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def loss_tokens(self, tokens_per_step: int, tokens: int) -> int:
        """Targets since the previous curve row: the loss sum's denominator."""
        previous = self.curve[-1]["step"] if self.curve else 0
        return min(self.step * tokens_per_step, tokens) - min(previous * tokens_per_step, tokens)

    def saved(self) -> dict:
        return {
            "step": self.step,
            "curve": self.curve,
            "elapsed_s": self.elapsed(),
            "loss_sum": summed(self.loss_sum, self.processes).item(),
        }


def curve_row(progress: Progress, spec: dict, lr: float, peak: float | None) -> dict:
    """The training curve's row for the current step; resets the loss and throughput sums."""
    tokens_per_step = spec["batch_size"] * spec["shape"]["context_length"]
    tokens_seen = min(progress.step * tokens_per_step, spec["tokens"])
    loss = summed(progress.loss_sum, progress.processes).item() / progress.loss_tokens(
        tokens_per_step, spec["tokens"]
    )
    now = time.perf_counter()
    tokens_per_second = progress.timed_tokens / (now - progress.timed_since)
    flops_per_second = flops_per_token(spec["shape"], spec["n_params"]) * tokens_per_second
    world_size = progress.processes.world_size
    progress.loss_sum.zero_()
    progress.timed_since, progress.timed_tokens = now, 0
    return {
        "step": progress.step,
        "tokens": tokens_seen,
        "loss": loss,
        "lr": lr,
        "tokens_per_s": tokens_per_second,
        "mfu": flops_per_second / (peak * 1e12 * world_size) if peak else None,
        "elapsed_s": progress.elapsed(),
    }


def format_row(row: dict, steps: int, tokens: int) -> str:
    """A curve row as the job's log line."""
    mfu = f" | MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
    eta = (tokens - row["tokens"]) / row["tokens_per_s"]
    return (
        f"step {row['step']}/{steps} | tokens {row['tokens']:,}/{tokens:,} | "
        f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s"
        f"{mfu} | ETA {format_duration(eta)}"
    )


def train(spec: dict, data_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Run (or resume) the training described by ``spec``; return the summary it writes.

    Under torchrun every process calls this; they join each other here.
    """
    spec = {**ENGINE_DEFAULTS, **spec}
    processes = processes_from_environment()
    device = resolve_device(spec.get("device", "auto"), processes.local_rank)
    with communication(processes, device) as comm:
        return train_processes(
            spec, Path(data_dir), Path(tokenizer_dir), Path(out_dir), device, comm
        )


def train_processes(
    spec: dict,
    data_dir: Path,
    tokenizer_dir: Path,
    run_dir: Path,
    device: torch.device,
    comm: Communication,
) -> dict:
    """``train`` once the processes have joined (``comm``); only rank 0 writes."""
    run, processes = spec["run"], comm.processes
    work_dir = run_dir / "work"
    resume_path = work_dir / "resume.pt"
    checkpoint_dir = work_dir / "checkpoints"
    threads = spec.get("threads") or 1
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    transformers_logging.disable_progress_bar()

    context_length = spec["shape"]["context_length"]
    batch_size, tokens = spec["batch_size"], spec["tokens"]
    tokens_per_step = batch_size * context_length
    steps = math.ceil(tokens / tokens_per_step)
    shards = TokenShards(data_dir)
    check_run(spec, shards, steps, processes)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])
    trainer = build_trainer(spec, device, processes)
    peak = peak_tflops(device, spec["peak_tflops"])

    identity = spec_hash(spec)
    state = load_resume_state(resume_path, identity, checkpoint_dir, spec)
    barrier(processes)  # every process has read the state before rank 0 may remove it
    if state is None:
        if processes.is_main:
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True)
        progress = Progress(None, device, processes)
    else:
        restore_state(trainer, state)
        progress = Progress(state["progress"], device, processes)
        if processes.is_main:
            log(f"{run}: resuming at step {progress.step}/{steps} from {resume_path}")
    if processes.is_main:
        sharing = f" ({spec['parallelism']})" if processes.distributed else ""
        log(
            f"{run}: {spec['n_params']:,} parameters, {tokens:,} tokens in {steps} steps of "
            f"{tokens_per_step:,} on {processes.world_size} x {device.type}{sharing} "
            f"(threads={threads})"
        )

    def save_resume_state() -> None:
        weights, optimizer_state = gathered_state(trainer)
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
            with atomic_path(resume_path) as temporary:
                torch.save(saved, temporary)

    trainer.objective.train()
    with StopSignals() as stop:
        while progress.step < steps:
            inputs, targets, n_targets = read_batch(
                shards, progress.step, batch_size, context_length, tokens, processes
            )
            batch = Batch(to_device(inputs, device), to_device(targets, device), n_targets)
            lr = learning_rate(progress.step + 1, steps, spec["lr"], spec["warmup"], spec["min_lr"])
            progress.loss_sum += train_step(
                trainer.objective, trainer.optimizer, batch, lr, trainer.settings
            )
            progress.step += 1
            progress.timed_tokens += n_targets
            step = progress.step

            if step % spec["log_every"] == 0 or step == steps:
                row = curve_row(progress, spec, lr, peak)
                progress.curve.append(row)
                if processes.is_main:
                    log(format_row(row, steps, tokens))
            if step in spec["checkpoint_steps"]:
                save_checkpoint(checkpoint_dir / f"step{step:06d}", trainer, tokenizer, processes)
            stopping = step < steps and any_process(stop.received is not None, comm)
            if step < steps and (step % spec["resume_every"] == 0 or stopping):
                save_resume_state()
            if stopping:
                number = stop.received or signal.SIGTERM
                if processes.is_main:
                    log(f"{run}: stopped by signal {number} at step {step}; rerun to resume")
                raise SystemExit(128 + number)

    wall_seconds = progress.elapsed()
    summary = {
        "run": run,
        "n_params": spec["n_params"],
        "tokens": tokens,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "final_loss": progress.curve[-1]["loss"],
        "wall_s": wall_seconds,
        "tokens_per_s": tokens / wall_seconds,
        "processes": processes.world_size,
        "device": str(device.type),
        "threads": threads if device.type == "cpu" else None,
        "spec_hash": identity,
    }
    if processes.is_main:
        # The checkpoints leave work/ last: until they do, a kill leaves the resume state
        # and its checkpoints together, and the re-run resumes instead of starting over.
        with atomic_path(run_dir / "curve.parquet") as temporary:
            pd.DataFrame(progress.curve).to_parquet(temporary, index=False)
        write_json(run_dir / "train.json", summary)
        with atomic_path(run_dir / "checkpoints") as temporary:
            os.replace(checkpoint_dir, temporary)
        shutil.rmtree(work_dir)
        log(
            f"{run}: done, final loss {summary['final_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s over {format_duration(wall_seconds)}"
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the run's spec as one JSON object")
    parser.add_argument("--data", required=True, help="token shard directory of the train split")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--out-dir", required=True, help="the run's directory (RUN_DIR)")
    parser.add_argument("--threads", type=int, help="CPU threads (overrides the spec's)")
    parser.add_argument(
        "--engine",
        default="{}",
        help=f"JSON object of speed and memory settings that leave the result alone: "
        f"{', '.join(ENGINE_KEYS)}",
    )
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    engine = json.loads(args.engine)
    unknown = set(engine) - set(ENGINE_KEYS)
    if unknown:
        parser.error(f"unknown --engine keys {sorted(unknown)}; known: {', '.join(ENGINE_KEYS)}")
    spec.update(engine)
    if args.threads is not None:
        spec["threads"] = args.threads
    try:
        train(spec, args.data, args.tokenizer, args.out_dir)
    except TrainError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
