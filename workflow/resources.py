"""What one train or evaluate job asks a cluster scheduler for, derived from its run.

A grid spans three orders of magnitude of compute, so one fixed request per rule either
wastes the queue on the small runs or kills the large ones. The rules instead attach these
functions as Snakemake resources (`rule_resources`), which the Slurm executor turns into
``sbatch -t/--mem/--gpus``: the runtime follows the run's compute C = 6ND and a throughput
the user measured (``cluster`` in the config), the memory follows the parameter count. An
estimate that is too small costs one retry, not the run: the profile resubmits a failed job
(``retries``) with ``attempt`` times the time and memory, and training resumes from its last
resume state.

Pure arithmetic on the config, like workflow.runs: Snakemake calls it while planning. Run as
a module, it prints what a whole config would cost before anything is submitted:

    python -m workflow.resources --configfile presets/paper.yaml
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from workflow.config import ConfigError, validate_config
from workflow.runs import Run, trained_runs

if TYPE_CHECKING:
    import pandas as pd

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


def gpus_per_job(config: dict, run: Run) -> int:
    """GPUs of one job: ``cluster.gpus`` of the size (the trainer runs one process per GPU
    under torchrun, DDP or FSDP), 1 by default; none when the config trains on CPU."""
    if config["train"]["device"] == "cpu":
        return 0
    return config["cluster"]["gpus"].get(run.size, 1)


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
    gpus = gpus_per_job(config, run)
    seconds = run.tokens / (tokens_per_second(config, run) * max(gpus, 1))
    return {
        "runtime": runtime_minutes(config, seconds, attempt),
        "mem_mb": memory_mb(TRAINING_BYTES_PER_PARAMETER, run, attempt),
        "gpu": gpus,
    }


def evaluation_gpus(config: dict, run: Run) -> int:
    """Evaluation is one process: one GPU however many the run trained on (none on CPU)."""
    return min(gpus_per_job(config, run), 1)


def evaluate_resources(config: dict, run: Run, attempt: int = 1) -> dict[str, int]:
    """Resources of the job that evaluates one checkpoint of ``run`` on every validation set."""
    validation = config["validation"]
    tokens = validation["max_tokens"] * len(validation["sets"])
    seconds = tokens / (EVALUATION_SPEEDUP * tokens_per_second(config, run))
    return {
        "runtime": runtime_minutes(config, seconds, attempt),
        "mem_mb": memory_mb(EVALUATION_BYTES_PER_PARAMETER, run, attempt),
        "gpu": evaluation_gpus(config, run),
    }


# Tokens the paper's suite scores per checkpoint: items x choices x prompt tokens over its
# tasks (eval_metadata.csv's item counts; 10-shot prompts of ~1,000 tokens), about 1e8.
PAPER17_TOKENS = 1.0e8
# Sequences the offline suite scores per item: four choices, twice for a task ranked by
# mutual information (the choices alone as well); every one at most a context long.
OFFLINE_SEQUENCES_PER_ITEM = 8


def downstream_resources(config: dict, run: Run, attempt: int = 1) -> dict[str, int]:
    """Resources of the job that runs one checkpoint of ``run`` through the downstream suite."""
    downstream = config["downstream"]
    if downstream["suite"] == "paper17":
        tokens = PAPER17_TOKENS
    else:
        sequences = len(downstream["tasks"]) * downstream["examples"] * OFFLINE_SEQUENCES_PER_ITEM
        tokens = sequences * config["sizes"][run.size]["context_length"]
    seconds = tokens / (EVALUATION_SPEEDUP * tokens_per_second(config, run))
    return {
        "runtime": runtime_minutes(config, seconds, attempt),
        "mem_mb": memory_mb(EVALUATION_BYTES_PER_PARAMETER, run, attempt),
        "gpu": evaluation_gpus(config, run),
    }


def job_gpus(resources: Mapping) -> int:
    """GPUs a job was given, as the Slurm executor asks for them: its ``gpu`` resource, or,
    for a profile that asks by generic resources (``gres: gpu:N`` with ``gpu: 0``), the count
    in ``gres`` (``gpu``, ``gpu:N`` or ``gpu:MODEL:N``; Slurm's count defaults to 1)."""
    if resources.get("gpu"):
        return int(resources["gpu"])
    gpus = 0
    for entry in str(resources.get("gres") or "").split(","):
        fields = entry.strip().split(":")
        if fields[0] == "gpu":
            gpus += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return gpus


def launch_command(n_processes: int) -> str:
    """The program a training job starts ``-m workflow.train`` with: one process per GPU.

    ``--standalone`` lets torchrun pick a free rendezvous port on the node, so several jobs
    can share one machine.
    """
    if n_processes <= 1:
        return "python"
    return f"torchrun --standalone --nproc_per_node {n_processes}"


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


def gpu_hours(config: dict, run: Run) -> float:
    """Estimated device-hours of training ``run``: its tokens over the throughput, no margin."""
    return run.tokens / tokens_per_second(config, run) / 3600


def cost_table(config: dict) -> pd.DataFrame:
    """Per size: runs, GPUs per job, compute and estimated GPU-hours of training, and the
    longest job's wall time as requested (hours)."""
    import pandas as pd  # here, not at the top: Snakemake imports this module to plan

    rows = [
        {
            "size": run.size,
            "N": run.n_params,
            "runs": 1,
            "gpus_per_job": gpus_per_job(config, run),
            "C": run.compute,
            "gpu_hours": gpu_hours(config, run),
            "max_runtime_h": train_resources(config, run)["runtime"] / 60,
        }
        for run in trained_runs(config)
    ]
    table = (
        pd.DataFrame(rows)
        .groupby(["size", "N"], sort=False)
        .agg(
            {
                "runs": "sum",
                "gpus_per_job": "max",
                "C": "sum",
                "gpu_hours": "sum",
                "max_runtime_h": "max",
            }
        )
        .reset_index()
    )
    total = {"size": "total", **table[["runs", "C", "gpu_hours"]].sum().to_dict()}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    return table.astype({"runs": int})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Estimated training cost of a config's grid.")
    parser.add_argument("--configfile", default="config.yaml")
    args = parser.parse_args(argv)
    try:
        config = validate_config(yaml.safe_load(Path(args.configfile).read_text()))
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f"workflow.resources: {error}")
    table = cost_table(config)
    print(
        table.to_string(
            index=False,
            na_rep="",
            formatters={
                "N": "{:,.0f}".format,
                "gpus_per_job": "{:.0f}".format,
                "C": "{:.3g}".format,
                "gpu_hours": "{:,.1f}".format,
                "max_runtime_h": "{:,.1f}".format,
            },
        )
    )


if __name__ == "__main__":
    main()
