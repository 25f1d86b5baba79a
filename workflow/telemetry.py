"""What a training run reports: the loss curve's rows, the job's log lines and its summary.

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
from workflow.settings import Cooldown, RunSpec, TrunkSpec


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


def curve_row(
    progress: Progress, spec: RunSpec | TrunkSpec, tokens: int, lr: float, peak: float | None
) -> dict:
    """The training curve's row for the current step of a run (or trunk) of ``tokens``;
    resets the loss and throughput sums."""
    tokens_seen = min(progress.step * spec.tokens_per_step, tokens)
    loss = summed(progress.loss_sum, progress.processes).item() / progress.loss_tokens(
        spec.tokens_per_step, tokens
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


def run_summary(
    spec: RunSpec,
    progress: Progress,
    identity: str,
    device: torch.device,
    threads: int,
    cooldown: Cooldown | None = None,
) -> dict:
    """The finished run's summary (train.json), with whether its curve shows divergence. A
    warmup-stable-decay run's also names its branch point and decay; its wall time and
    throughput count its trunk part, as its curve does."""
    wall_seconds = progress.elapsed()
    diverged = divergence(progress.curve, spec.tokens)
    branched = {}
    if cooldown is not None:
        branched = {"trunk": cooldown.trunk, "branch_step": cooldown.branch_step}
        branched["decay"] = cooldown.decay
    return {
        "run": spec.run,
        "n_params": spec.n_params,
        "tokens": spec.tokens,
        "steps": spec.steps,
        "tokens_per_step": spec.tokens_per_step,
        "final_loss": progress.curve[-1]["loss"],
        "diverged": diverged is not None,
        "divergence_reason": diverged,
        "wall_s": wall_seconds,
        "tokens_per_s": spec.tokens / wall_seconds,
        "processes": progress.processes.world_size,
        "device": str(device.type),
        "threads": threads if device.type == "cpu" else None,
        "spec_hash": identity,
        **branched,
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


# How far above its lowest the smoothed loss may end before the run counts as diverged.
DIVERGENCE_RISE = 0.2


def divergence(curve: list[dict], tokens: int) -> str | None:
    """Why the finished run's curve shows it diverged, or None if it does not.

    The tail is the fewest last rows that hold a tenth of the run's ``tokens`` (so a short
    last step joins the rows before it); the smoothed loss is the token-weighted mean over
    each window of as many consecutive rows. The run diverged if the tail's loss is more than
    ``DIVERGENCE_RISE`` above the lowest window's: a run that learns ends at or near its
    lowest loss, and its noise stays far below that margin.
    """
    ends = [row["tokens"] for row in curve]
    weights = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    window = 1
    while window < len(curve) and sum(weights[-window:]) < tokens / 10:
        window += 1

    def smoothed(last: int) -> float:
        rows = range(last - window + 1, last + 1)
        total = sum(weights[row] * curve[row]["loss"] for row in rows)
        return total / sum(weights[row] for row in rows)

    def steps(last: int) -> str:
        first_step = curve[last - window]["step"] + 1 if last >= window else 1
        return f"steps {first_step}-{curve[last]['step']}"

    lowest = min(range(window - 1, len(curve)), key=smoothed)
    final, best = smoothed(len(curve) - 1), smoothed(lowest)
    if final <= (1 + DIVERGENCE_RISE) * best:
        return None
    return (
        f"the mean training loss of the last tenth of the tokens ({steps(len(curve) - 1)}) is "
        f"{final:.4f}, {final / best - 1:.0%} above its lowest, {best:.4f} ({steps(lowest)})"
    )
