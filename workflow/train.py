"""Train stage: one model on exactly D = M x N tokens, resumable, outputs only when finished.

The paper's recipe (open_lm): AdamW (beta2 0.95, eps 1e-8, weight decay on every parameter,
norm gains and embeddings included, as open_lm does), linear warmup then cosine decay to
``min_lr`` at the last step, gradient clipping at ``grad_clip``, and a z-loss
``z_loss * logsumexp(logits)^2`` added to the training objective (the logged loss is the plain
cross-entropy). bf16 autocast on CUDA, fp32 on CPU.

Token accounting is exact and needs no state: sequence ``i`` is stream ids
``[i*T, i*T + T + 1)`` (inputs, then the same window shifted by one as targets), sequences are
consumed in order from the start of the stream, and the last sequence (and so the last batch)
is cut short so that exactly D ids are predicted, each once. A step's data is therefore a pure
function of the step number, which is what makes resuming exact.

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
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from workflow.atomic import atomic_path, write_json
from workflow.model import ScalingLM, build_model
from workflow.shards import TokenShards

IGNORE_INDEX = -100
# Rows of logits the fused output loss materialises at once: about 4 MB of fp32 logits stays in
# a CPU's cache; on a GPU larger chunks only need to bound memory (V = 50k: 1,300 rows).
LOSS_CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}
# Keys that do not change what is computed: a run may resume under different values.
SPEC_KEYS_NOT_HASHED = ("threads",)


class TrainError(RuntimeError):
    """A run that cannot start as specified; the message names the run and the fix."""


@dataclass
class Batch:
    """One optimizer step's sequences; ``targets`` is IGNORE_INDEX past the run's last token."""

    inputs: torch.Tensor
    targets: torch.Tensor
    n_targets: int


@dataclass
class StepSettings:
    """What ``train_step`` needs besides the model, the optimizer and the batch."""

    micro_batch_size: int
    z_loss: float
    grad_clip: float
    device: torch.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("spec device is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    return torch.device(name)


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
    shards: TokenShards, step_index: int, batch_size: int, context_length: int, tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Inputs and targets (both (sequences, T) int64) of 0-based step ``step_index``.

    The step predicts stream ids ``start+1 .. start+n`` with ``start = step_index*B*T``;
    in a short last step the unused positions of the last sequence get input 0 and target
    IGNORE_INDEX (causal attention keeps them from affecting the real positions).
    """
    tokens_per_step = batch_size * context_length
    start = step_index * tokens_per_step
    n_targets = min(tokens_per_step, tokens - start)
    n_sequences = math.ceil(n_targets / context_length)
    ids = shards.read(start, n_targets + 1)
    inputs = np.zeros(n_sequences * context_length, dtype=np.int64)
    targets = np.full(n_sequences * context_length, IGNORE_INDEX, dtype=np.int64)
    inputs[:n_targets] = ids[:-1]
    targets[:n_targets] = ids[1:]
    shape = (n_sequences, context_length)
    return inputs.reshape(shape), targets.reshape(shape), n_targets


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
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


def train_step(
    model: ScalingLM,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    lr: float,
    settings: StepSettings,
) -> torch.Tensor:
    """One optimizer step on ``batch``; returns its mean cross-entropy as a 0-d tensor.

    Gradients of the micro-batches accumulate with each one's objective divided by the
    step's target count, so the step minimises the mean over all its targets whatever the
    micro-batching and however short the last batch. Nothing here waits for the device.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    cross_entropy_sum = torch.zeros((), device=settings.device)
    for begin in range(0, len(batch.inputs), settings.micro_batch_size):
        inputs = batch.inputs[begin : begin + settings.micro_batch_size]
        targets = batch.targets[begin : begin + settings.micro_batch_size]
        with torch.autocast(
            settings.device.type,
            dtype=settings.autocast_dtype,
            enabled=settings.autocast_dtype is not None,
        ):
            hidden = model.final_hidden_states(inputs)
            objective, cross_entropy = output_loss(model, hidden, targets, settings.z_loss)
        (objective / batch.n_targets).backward()
        cross_entropy_sum += cross_entropy
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return cross_entropy_sum / batch.n_targets


def make_optimizer(model: ScalingLM, spec: dict, device: torch.device) -> torch.optim.AdamW:
    """PyTorch AdamW (decay scaled by the current lr) over all parameters, as open_lm."""
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


def check_run(spec: dict, shards: TokenShards, steps: int) -> None:
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


def check_parameter_count(spec: dict, model: ScalingLM) -> None:
    n_params = sum(parameter.numel() for parameter in model.parameters())
    if n_params != spec["n_params"]:
        raise TrainError(
            f"{spec['run']}: the model of shape {spec['shape']} has {n_params:,} parameters "
            f"but the spec says n_params = {spec['n_params']:,}; "
            "workflow.runs.count_parameters and workflow.model disagree"
        )


class StopSignals:
    """Inside the block, SIGTERM and SIGINT only record themselves in ``received``.

    The loop checks it between steps, saves a resume state and exits, instead of dying
    mid-step; the previous handlers come back when the block ends.
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


def load_resume_state(
    path: Path, expected_hash: str, checkpoint_dir: Path, spec: dict
) -> dict | None:
    """The saved state if it belongs to this spec and its checkpoints are all there."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
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


def save_checkpoint(directory: Path, model: ScalingLM, tokenizer: PreTrainedTokenizerBase) -> None:
    with atomic_path(directory) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)


def train(spec: dict, data_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Run (or resume) the training described by ``spec``; return the summary it writes."""
    run = spec["run"]
    run_dir = Path(out_dir)
    work_dir = run_dir / "work"
    resume_path = work_dir / "resume.pt"
    checkpoint_dir = work_dir / "checkpoints"
    device = resolve_device(spec.get("device", "auto"))
    threads = spec.get("threads") or 1
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    transformers_logging.disable_progress_bar()

    shape = spec["shape"]
    context_length = shape["context_length"]
    batch_size = spec["batch_size"]
    tokens = spec["tokens"]
    tokens_per_step = batch_size * context_length
    steps = math.ceil(tokens / tokens_per_step)
    shards = TokenShards(data_dir)
    check_run(spec, shards, steps)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])
    model = build_model(shape)
    check_parameter_count(spec, model)
    model.to(device)
    optimizer = make_optimizer(model, spec, device)
    settings = StepSettings(
        micro_batch_size=spec.get("micro_batch_size") or batch_size,
        z_loss=spec["z_loss"],
        grad_clip=spec["grad_clip"],
        device=device,
    )

    # Everything the loop carries from step to step, restored as a whole when resuming.
    # The curve's loss is the token-weighted mean over the steps since the previous row.
    identity = spec_hash(spec)
    state = load_resume_state(resume_path, identity, checkpoint_dir, spec)
    if state is None:
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        progress = {"step": 0, "curve": [], "elapsed_s": 0.0, "loss_sum": 0.0, "loss_tokens": 0}
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        progress = state["progress"]
        log(f"{run}: resuming at step {progress['step']}/{steps} from {resume_path}")
    log(
        f"{run}: {spec['n_params']:,} parameters, {tokens:,} tokens in {steps} steps of "
        f"{tokens_per_step:,} on {device} (threads={threads})"
    )

    step, curve = progress["step"], progress["curve"]
    loss_sum = torch.tensor(progress["loss_sum"], device=device)
    loss_tokens = progress["loss_tokens"]
    session_started = time.perf_counter()
    timed_since, timed_tokens = session_started, 0

    def elapsed() -> float:
        return progress["elapsed_s"] + time.perf_counter() - session_started

    def save_resume_state() -> None:
        state = {
            "spec_hash": identity,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "progress": {
                "step": step,
                "curve": curve,
                "elapsed_s": elapsed(),
                "loss_sum": loss_sum.item(),
                "loss_tokens": loss_tokens,
            },
        }
        with atomic_path(resume_path) as temporary:
            torch.save(state, temporary)

    model.train()
    with StopSignals() as stop:
        while step < steps:
            inputs, targets, n_targets = read_batch(
                shards, step, batch_size, context_length, tokens
            )
            batch = Batch(to_device(inputs, device), to_device(targets, device), n_targets)
            lr = learning_rate(step + 1, steps, spec["lr"], spec["warmup"], spec["min_lr"])
            loss = train_step(model, optimizer, batch, lr, settings)
            step += 1
            loss_sum += loss * n_targets
            loss_tokens += n_targets
            timed_tokens += n_targets

            if step % spec["log_every"] == 0 or step == steps:
                mean_loss = loss_sum.item() / loss_tokens
                now = time.perf_counter()
                tokens_per_second = timed_tokens / (now - timed_since)
                tokens_seen = min(step * tokens_per_step, tokens)
                curve.append(
                    {
                        "step": step,
                        "tokens": tokens_seen,
                        "loss": mean_loss,
                        "lr": lr,
                        "tokens_per_s": tokens_per_second,
                        "elapsed_s": elapsed(),
                    }
                )
                log(
                    f"step {step}/{steps} | tokens {tokens_seen:,}/{tokens:,} | "
                    f"loss {mean_loss:.4f} | lr {lr:.2e} | {tokens_per_second:,.0f} tok/s | "
                    f"ETA {format_duration((tokens - tokens_seen) / tokens_per_second)}"
                )
                loss_sum.zero_()
                loss_tokens = 0
                timed_since, timed_tokens = now, 0
            if step in spec["checkpoint_steps"]:
                save_checkpoint(checkpoint_dir / f"step{step:06d}", model, tokenizer)
            if step < steps and (step % spec["resume_every"] == 0 or stop.received):
                save_resume_state()
            if step < steps and stop.received:
                log(f"{run}: stopped by signal {stop.received} at step {step}; rerun to resume")
                raise SystemExit(128 + stop.received)

    wall_seconds = elapsed()
    summary = {
        "run": run,
        "n_params": spec["n_params"],
        "tokens": tokens,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "final_loss": curve[-1]["loss"],
        "wall_s": wall_seconds,
        "tokens_per_s": tokens / wall_seconds,
        "device": str(device),
        "threads": threads if device.type == "cpu" else None,
        "spec_hash": identity,
    }
    with atomic_path(run_dir / "checkpoints") as temporary:
        os.replace(checkpoint_dir, temporary)
    with atomic_path(run_dir / "curve.parquet") as temporary:
        pd.DataFrame(curve).to_parquet(temporary, index=False)
    write_json(run_dir / "train.json", summary)
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
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    if args.threads is not None:
        spec["threads"] = args.threads
    try:
        train(spec, args.data, args.tokenizer, args.out_dir)
    except TrainError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
