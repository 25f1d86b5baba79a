"""What a training run reports as it goes: the loss curve's rows and the job's log lines.

Every ``log_every`` steps the curve gets step, tokens, loss, lr, tokens/s and MFU
(``workflow.device.flops_per_token`` against the device's peak); those are the only steps at
which the host waits for the device.
"""

from __future__ import annotations

import sys
import time

import torch

from workflow.device import flops_per_token
from workflow.distributed import Processes, summed
from workflow.settings import RunSpec


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


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
        """The state to resume from; every process must call it (the loss sum is summed)."""
        return {
            "step": self.step,
            "curve": self.curve,
            "elapsed_s": self.elapsed(),
            "loss_sum": summed(self.loss_sum, self.processes).item(),
        }


def curve_row(progress: Progress, spec: RunSpec, lr: float, peak: float | None) -> dict:
    """The training curve's row for the current step; resets the loss and throughput sums."""
    tokens_seen = min(progress.step * spec.tokens_per_step, spec.tokens)
    loss = summed(progress.loss_sum, progress.processes).item() / progress.loss_tokens(
        spec.tokens_per_step, spec.tokens
    )
    now = time.perf_counter()
    tokens_per_second = progress.timed_tokens / (now - progress.timed_since)
    flops_per_second = flops_per_token(spec.shape, spec.n_params) * tokens_per_second
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
