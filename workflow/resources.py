"""What one train or evaluate job asks a cluster scheduler for, derived from its run.

A grid spans three orders of magnitude of compute, so one fixed request per rule either
wastes the queue on the small runs or kills the large ones. The rules instead attach these
functions as Snakemake resources (`rule_resources`), which the Slurm executor turns into
``sbatch -t/--mem/--gpus``: the runtime follows the run's compute C = 6ND and a throughput
the user measured (``cluster`` in the config), the memory follows the parameter count. An
estimate that is too small costs one retry, not the run: the profile resubmits a failed job
(``retries``) with ``attempt`` times the time and memory, and training resumes from its last
resume state.

Pure arithmetic on the config, like workflow.runs: Snakemake calls it while planning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from workflow.runs import Run

# Resources every derivation returns: sbatch -t (minutes), --mem (MB) and --gpus.
RESOURCE_NAMES = ("runtime", "mem_mb", "gpu")

# Host memory of any job before the model: Python, torch, the CUDA context, the data index.
BASE_MEMORY_MB = 4096
# Host bytes per parameter while training: a resume state (fp32 weights and Adam's two
# moments) and a checkpoint pass through host memory when they are written.
TRAINING_BYTES_PER_PARAMETER = 16
# Evaluation loads fp32 weights (4 bytes) and builds the model from them (4 more).
EVALUATION_BYTES_PER_PARAMETER = 8
# A forward pass costs 2N FLOPs per token, a training step 6N: evaluation runs 3x as fast.
EVALUATION_SPEEDUP = 3
MEMORY_STEP_MB = 1024

ResourceFunction = Callable[[dict, Run, int], dict[str, int]]


def gpus_per_job(config: dict) -> int:
    """One GPU per job (the trainer is single-device); none when the config trains on CPU."""
    return 0 if config["train"]["device"] == "cpu" else 1


def tokens_per_second(config: dict, run: Run) -> float:
    """Training throughput of one device: measured for the size, or from the FLOP rate."""
    cluster = config["cluster"]
    measured = cluster["tokens_per_second"].get(run.size)
    if measured is not None:
        return float(measured)
    return cluster["flops_per_gpu"] / (6.0 * run.n_params)


def runtime_minutes(config: dict, compute_seconds: float, attempt: int) -> int:
    """Wall time to ask for: the estimate with its margin, plus the fixed overhead."""
    cluster = config["cluster"]
    minutes = cluster["runtime_overhead"] + math.ceil(
        compute_seconds * cluster["runtime_margin"] / 60
    )
    return minutes * attempt


def memory_mb(bytes_per_parameter: int, run: Run, attempt: int) -> int:
    """Host memory to ask for, rounded up to whole GiB."""
    needed = BASE_MEMORY_MB + bytes_per_parameter * run.n_params / 2**20
    return math.ceil(needed / MEMORY_STEP_MB) * MEMORY_STEP_MB * attempt


def train_resources(config: dict, run: Run, attempt: int = 1) -> dict[str, int]:
    """Resources of the job that trains ``run`` on its D tokens."""
    gpus = gpus_per_job(config)
    seconds = run.tokens / (tokens_per_second(config, run) * max(gpus, 1))
    return {
        "runtime": runtime_minutes(config, seconds, attempt),
        "mem_mb": memory_mb(TRAINING_BYTES_PER_PARAMETER, run, attempt),
        "gpu": gpus,
    }


def evaluate_resources(config: dict, run: Run, attempt: int = 1) -> dict[str, int]:
    """Resources of the job that evaluates one checkpoint of ``run`` on every validation set."""
    validation = config["validation"]
    tokens = validation["max_tokens"] * len(validation["sets"])
    seconds = tokens / (EVALUATION_SPEEDUP * tokens_per_second(config, run))
    return {
        "runtime": runtime_minutes(config, seconds, attempt),
        "mem_mb": memory_mb(EVALUATION_BYTES_PER_PARAMETER, run, attempt),
        "gpu": gpus_per_job(config),
    }


def rule_resources(
    derive: ResourceFunction, config: dict, run_of: Callable[[object], Run]
) -> dict[str, Callable]:
    """``derive`` as Snakemake resources: one callable of (wildcards, attempt) per resource.

    ``run_of`` maps a job's wildcards to its Run. Snakemake calls each resource with the
    job's wildcards and attempt (1, then 2 on the first retry), so nothing is fixed per job.
    """

    def resource(name: str) -> Callable:
        def value(wildcards, attempt: int) -> int:
            return derive(config, run_of(wildcards), attempt)[name]

        return value

    return {name: resource(name) for name in RESOURCE_NAMES}
