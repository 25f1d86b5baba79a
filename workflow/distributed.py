"""Data parallelism for the train stage: one process per device, started by ``torchrun``.

torchrun gives every process ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and where to meet);
without them the trainer is a single process and nothing here communicates. Each process
holds the whole model (DDP) or a shard of it (FSDP, ``fully_shard``), reads its own disjoint
slice of every global batch (``workflow.shards.read_batch``) and the gradients are summed
across processes, so a step sees exactly the global batch one process would, and the run
still consumes exactly D tokens. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

# How the processes share the model: every process holds all of it, or a shard of it.
PARALLELISMS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the run's processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = Processes()


def processes_from_environment() -> Processes:
    """The process layout torchrun set up, or a single process when started plainly."""
    return Processes(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


@dataclass
class Communication:
    """The process groups of a distributed run; ``signals`` is a CPU (gloo) group.

    Deciding together to stop on a signal must not wait for the GPU, so that all-reduce runs
    on the host through its own gloo group (it is the default group when training on CPU).
    """

    processes: Processes
    signals: dist.ProcessGroup | None = None


@contextmanager
def communication(processes: Processes, device: torch.device) -> Iterator[Communication]:
    """Join the other processes (NCCL on GPUs, gloo on CPUs) for the block's duration."""
    if not processes.distributed:
        yield Communication(processes)
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
        signals = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        signals = None
    try:
        yield Communication(processes, signals)
    finally:
        dist.destroy_process_group()


def summed(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """``tensor`` summed over the processes (a copy; the local value is kept)."""
    total = tensor.detach().clone()
    if processes.distributed:
        dist.all_reduce(total)
    return total


def any_process(flag: bool, comm: Communication) -> bool:
    """Whether ``flag`` is set in any process, so that all act on it at the same step."""
    if not comm.processes.distributed:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=comm.signals)
    return bool(value.item())


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


def wrap(
    module: nn.Module, blocks: nn.ModuleList, processes: Processes, parallelism: str
) -> nn.Module:
    """``module`` ready for data-parallel training (unchanged in a single process).

    FSDP shards each block on its own, so only one block is whole at a time, and the rest
    (embeddings, final norm, output layer) as the root.
    """
    if not processes.distributed:
        return module
    if parallelism == "fsdp":
        for block in blocks:
            fully_shard(block)
        return fully_shard(module)
    return DistributedDataParallel(module)


def gradient_sync(module: nn.Module, enabled: bool) -> AbstractContextManager:
    """A block in which backward passes only accumulate locally (all but the last micro-batch)."""
    if isinstance(module, DistributedDataParallel) and not enabled:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    return nullcontext()
