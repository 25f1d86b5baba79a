"""Evaluate stage: validation loss of one checkpoint on every validation set.

Each set is cut into the same sequences for every model, so differences between models are
not sampling noise: ``max_tokens // context_length`` windows spread evenly over the whole
validation split (all of it when it is smaller). Taking the split's first ``max_tokens`` tokens
instead would score a handful of documents when they are long (as the default's docs_en's
are), and a model's loss on those few would stand for the distribution.
The 95% interval is a bootstrap over sequences, as the paper reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import workflow.model  # noqa: F401  (registers ScalingLM with the Auto classes)
from workflow.atomic import write_json
from workflow.device import resolve_device
from workflow.errors import TrainError
from workflow.integrity import DamagedOutputError, check_checkpoint
from workflow.intervals import TAILS_95
from workflow.shards import TokenShards


class EvaluateError(ValueError):
    """A validation set this stage cannot score; the message names it and the fix."""


def validation_sequences(shards: TokenShards, context_length: int, max_tokens: int) -> np.ndarray:
    """Windows of ``context_length + 1`` ids (inputs plus shifted targets), evenly spaced over
    the split's non-overlapping windows: every one of them when at most ``max_tokens`` fit."""
    n_windows = (shards.n_tokens - 1) // context_length
    n_sequences = min(max_tokens // context_length, n_windows)
    if n_sequences == 0:
        raise EvaluateError(
            f"{shards.directory} has {shards.n_tokens} tokens, fewer than one sequence of "
            f"{context_length + 1}; use a larger val_fraction for that dataset"
        )
    starts = np.arange(n_sequences) * n_windows // n_sequences * context_length
    return np.stack([shards.read(int(start), context_length + 1) for start in starts])


@torch.no_grad()
def sequence_losses(
    model: torch.nn.Module, sequences: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Mean next-token cross-entropy (nats) of each sequence."""
    losses = []
    for begin in range(0, len(sequences), batch_size):
        batch = torch.from_numpy(sequences[begin : begin + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch[:, :-1]).logits
        token_losses = F.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none"
        )
        losses.append(token_losses.view(len(batch), -1).mean(dim=1).cpu().numpy())
    return np.concatenate(losses)


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of the mean under resampling ``values`` with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, TAILS_95)  # NaN, as the loss itself, if a loss is NaN
    return float(low), float(high)


def evaluate_checkpoint(
    checkpoint: str | Path,
    validation_dirs: dict[str, str],
    outputs: dict[str, str],
    run: dict,
    max_tokens: int,
    bootstrap: int,
    batch_size: int,
    device: str,
) -> list[dict]:
    """Write each validation set's record to its file in ``outputs``; return the records.

    ``run`` carries the run's identity (dataset, size, N, M, D, step, tokens, final), so each
    JSON is one complete row of the aggregated table.
    """
    if set(outputs) != set(validation_dirs):
        raise EvaluateError(
            f"the validation sets {sorted(validation_dirs)} and the sets given an output file "
            f"{sorted(outputs)} differ; give each set both"
        )
    check_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).to(torch_device).eval()
    context_length = model.config.max_position_embeddings
    records = []
    for name, directory in validation_dirs.items():
        started = time.perf_counter()
        sequences = validation_sequences(TokenShards(directory), context_length, max_tokens)
        losses = sequence_losses(model, sequences, batch_size, torch_device)
        ci_low, ci_high = bootstrap_interval(losses, bootstrap)
        record = {
            **run,
            "metric": "loss",
            "eval": name,
            "value": float(losses.mean()),
            "ci_low": ci_low,
            "ci_high": ci_high,
            "n_examples": len(losses),
        }
        write_json(outputs[name], record)
        records.append(record)
        print(
            f"{name}: loss {record['value']:.4f} [{ci_low:.4f}, {ci_high:.4f}] on "
            f"{len(losses)} sequences x {context_length} tokens "
            f"in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained directory")
    parser.add_argument("--validation", required=True, help="JSON: set name -> token shard dir")
    parser.add_argument("--outputs", required=True, help="JSON: set name -> loss JSON to write")
    parser.add_argument("--run", required=True, help="JSON: the run's identity columns")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--bootstrap", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="sequences per forward")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", required=True, choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        evaluate_checkpoint(
            args.checkpoint,
            json.loads(args.validation),
            json.loads(args.outputs),
            json.loads(args.run),
            args.max_tokens,
            args.bootstrap,
            args.batch_size,
            args.device,
        )
    except (EvaluateError, TrainError, DamagedOutputError, FileNotFoundError) as error:
        sys.exit(f"evaluate_loss: {error}")


if __name__ == "__main__":
    main()
