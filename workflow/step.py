"""One optimizer step of training: the model and optimizer a run steps with, and the step.

The paper's recipe (open_lm): AdamW (beta2 0.95, eps 1e-8, weight decay on every parameter,
norm gains and embeddings included), linear warmup then cosine decay to ``min_lr`` at the last
step (under train.schedule wsd: the peak until the run's branch point, then its cooldown's
decay to ``min_lr``; ``schedule``), gradient clipping at ``grad_clip``, and a z-loss
``z_loss * logsumexp(logits)^2`` in the objective (``workflow.model.OutputLoss``; the logged
loss is the plain cross-entropy). bf16 autocast on CUDA, fp32 on CPU. The train stage's loop
and the throughput benchmark both step through here, so the benchmark times exactly the
pipeline's step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workflow.distributed import Processes, gradient_sync, wrap
from workflow.errors import TrainError
from workflow.model import ScalingLM, TrainingObjective, build_model
from workflow.settings import Cooldown, EngineSettings, RunSpec, TrunkSpec


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


# A warmup-stable-decay cooldown's shape: the share of (peak - floor) left after progress p.
DECAYS: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1 - progress,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1 - math.sqrt(progress),
}


def trunk_learning_rate(step: int, peak: float, warmup: int) -> float:
    """Learning rate of a trunk's step (train.schedule wsd): the same linear warmup as
    ``learning_rate``, then ``peak`` for as long as the trunk trains."""
    if step <= warmup:
        return peak * step / warmup
    return peak


def wsd_learning_rate(
    step: int,
    steps: int,
    peak: float,
    warmup: int,
    minimum: float,
    branch_step: int,
    decay: str,
) -> float:
    """Learning rate of a warmup-stable-decay run's step (1-based): its trunk's up to
    ``branch_step``, then a ``decay``-shaped fall to ``minimum`` exactly at the last step."""
    if step <= branch_step:
        return trunk_learning_rate(step, peak, warmup)
    progress = (step - branch_step) / (steps - branch_step)
    return minimum + (peak - minimum) * DECAYS[decay](progress)


def schedule(spec: RunSpec, cooldown: Cooldown | None) -> Callable[[int], float]:
    """The run's learning rate as a function of its step: cosine, or its cooldown's."""
    if cooldown is None:
        return lambda step: learning_rate(step, spec.steps, spec.lr, spec.warmup, spec.min_lr)
    return lambda step: wsd_learning_rate(
        step,
        spec.steps,
        spec.lr,
        spec.warmup,
        spec.min_lr,
        cooldown.branch_step,
        cooldown.decay,
    )


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


def make_optimizer(
    model: nn.Module, spec: RunSpec | TrunkSpec, device: torch.device
) -> torch.optim.AdamW:
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


@dataclass
class Trainer:
    """What a run's steps run on: the model, the objective ``train_step`` calls (the model's
    ``TrainingObjective``, wrapped for data parallelism), its optimizer and step settings."""

    model: ScalingLM
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    settings: StepSettings


def build_trainer(
    spec: RunSpec | TrunkSpec, engine: EngineSettings, device: torch.device, processes: Processes
) -> Trainer:
    """The model (initialised from the global RNG), wrapped for ``processes``, and its optimizer."""
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


def seeded_trainer(
    spec: RunSpec | TrunkSpec, engine: EngineSettings, device: torch.device, processes: Processes
) -> Trainer:
    """``build_trainer`` from the spec's seed, in training mode: every run and trunk of one
    size starts from the same weights."""
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    trainer = build_trainer(spec, engine, device, processes)
    trainer.objective.train()
    return trainer
