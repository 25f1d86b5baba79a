"""What one train or evaluate job asks a cluster scheduler for, derived from its run.

A grid spans three orders of magnitude of compute, so one fixed request per rule either
wastes the queue on the small runs or kills the large ones. The rules instead attach these
functions as Snakemake resources (`rule_resources`), which the Slurm executor turns into
``sbatch -t/--mem/--gpus``: the runtime follows the run's compute C = 6ND and a throughput
the user measured (``cluster`` in the config), the memory follows the parameter count. An
estimate that is too small costs one retry, not the run: the profile resubmits a failed job
(``retries``) with ``attempt`` times the time and memory, and training resumes from its last
resume state.

Under train.schedule wsd a run's job trains only its cooldown (``job_tokens``) and each
(dataset, size) has a trunk job (``trunk_resources``) that trains to its furthest branch point.

Pure arithmetic on the config, like workflow.runs: Snakemake calls it while planning. Run as
a module, it prints what a whole config would cost under either schedule before anything is
submitted:

    python -m workflow.resources --configfile presets/paper.yaml
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from workflow import laws
from workflow.config import ConfigError, validate_config
from workflow.runs import Run, Trunk, branch_step, trained_runs, trunks

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

ResourceFunction = Callable[[dict, Any, int], dict[str, int]]


def gpus_per_job(config: dict, run: Run | Trunk) -> int:
    """GPUs of one job: ``cluster.gpus`` of the size (the trainer runs one process per GPU
    under torchrun, DDP or FSDP), 1 by default; none when the config trains on CPU."""
    if config["train"]["device"] == "cpu":
        return 0
    return config["cluster"]["gpus"].get(run.size, 1)


def tokens_per_second(config: dict, run: Run | Trunk) -> float:
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


def memory_mb(bytes_per_parameter: int, run: Run | Trunk, attempt: int) -> int:
    """Host memory to ask for, rounded up to whole GiB."""
    needed = BASE_MEMORY_MB + bytes_per_parameter * run.n_params / 2**20
    return math.ceil(needed / MEMORY_STEP_MB) * MEMORY_STEP_MB * attempt


def job_tokens(run: Run, kept_trunk_steps: Sequence[int] = ()) -> int:
    """Tokens the job that trains ``run`` trains: its D under cosine. Under wsd its cooldown's
    share, D minus its branch point, plus the stretch of trunk it grows first when its trunk
    keeps no state there (a run added after its trunk ran): from the furthest of
    ``kept_trunk_steps`` before its branch point."""
    if run.branch_step is None:
        return run.tokens
    cooldown = run.tokens - run.branch_step * run.tokens_per_step
    if run.branch_step in kept_trunk_steps:
        return cooldown
    start = max((step for step in kept_trunk_steps if step < run.branch_step), default=0)
    return cooldown + (run.branch_step - start) * run.tokens_per_step


def training_resources(config: dict, job: Run | Trunk, tokens: int, attempt: int) -> dict:
    """Resources of a job that trains ``job``'s model on ``tokens`` tokens."""
    gpus = gpus_per_job(config, job)
    seconds = tokens / (tokens_per_second(config, job) * max(gpus, 1))
    return {
        "runtime": runtime_minutes(config, seconds, attempt),
        "mem_mb": memory_mb(TRAINING_BYTES_PER_PARAMETER, job, attempt),
        "gpu": gpus,
    }


def train_resources(
    config: dict, run: Run, attempt: int = 1, kept_trunk_steps: Sequence[int] = ()
) -> dict[str, int]:
    """Resources of the job that trains ``run``: on its D tokens, or its cooldown's share
    (``job_tokens``)."""
    return training_resources(config, run, job_tokens(run, kept_trunk_steps), attempt)


def trunk_resources(config: dict, trunk: Trunk, attempt: int = 1) -> dict[str, int]:
    """Resources of the job that trains a trunk (train.schedule wsd): to its furthest branch
    point (a trunk that keeps states already continues from them, and asks for too much)."""
    return training_resources(config, trunk, trunk.tokens, attempt)


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
    derive: ResourceFunction, config: dict, run_of: Callable[[object], Run | Trunk]
) -> dict[str, Callable]:
    """``derive`` as Snakemake resources: one callable of (wildcards, attempt) per resource.

    ``run_of`` maps a job's wildcards to its Run (or Trunk). Snakemake calls each resource
    with the job's wildcards and attempt (1, then 2 on the first retry), so nothing is fixed
    per job; it calls them again when the job's inputs are ready.
    """

    def resource(name: str) -> Callable:
        def value(wildcards, attempt: int) -> int:
            return derive(config, run_of(wildcards), attempt)[name]

        return value

    return {name: resource(name) for name in RESOURCE_NAMES}


def training_priority(job: Run | Trunk) -> float:
    """A training job's Snakemake priority: log10 of the compute 6 N x tokens of what it trains
    (a cosine run's D, a trunk to its furthest branch point, a wsd run's cooldown), so that
    among the jobs ready to run the longest starts first. Started in any other order, the
    largest run of a grid may start when the small ones are done and then train alone while
    the other cores idle. Evaluation jobs keep Snakemake's priority 0: none starts while a
    training job waits for a core."""
    tokens = job.tokens if isinstance(job, Trunk) else job_tokens(job, (job.branch_step,))
    return math.log10(laws.compute(job.n_params, tokens))


def gpu_hours(config: dict, job: Run | Trunk, tokens: int | None = None) -> float:
    """Estimated device-hours of training ``job`` on ``tokens`` (default: the run's D), no
    margin."""
    return (job.tokens if tokens is None else tokens) / tokens_per_second(config, job) / 3600


def wsd_tokens(config: dict, runs: Sequence[Run]) -> int:
    """Tokens the runs of one trunk train under wsd: the trunk to its furthest branch point,
    then each run's cooldown share."""
    branches = [branch_step(config, run.size, run.tokens) for run in runs]
    trunk = max(branches) * runs[0].tokens_per_step
    cooldowns = zip(runs, branches, strict=True)
    return trunk + sum(run.tokens - branch * run.tokens_per_step for run, branch in cooldowns)


def cost_table(config: dict) -> pd.DataFrame:
    """Per size: runs, GPUs per job, compute C = 6ND of the runs, and the training tokens and
    estimated GPU-hours under each schedule (cosine: every run from scratch; wsd: a trunk per
    (dataset, size) and a cooldown per run), and the longest job's wall time as requested
    under the config's schedule (hours)."""
    import pandas as pd  # here, not at the top: Snakemake imports this module to plan

    rows = []
    for trunk in trunks(config):
        runs = [run for run in trained_runs(config) if run.trunk_key == trunk.key]
        jobs = [train_resources(config, run) for run in runs]
        if config["train"]["schedule"] == "wsd":
            jobs.append(trunk_resources(config, trunk))
        tokens_wsd = wsd_tokens(config, runs)
        rows.append(
            {
                "size": trunk.size,
                "N": trunk.n_params,
                "runs": len(runs),
                "gpus_per_job": gpus_per_job(config, trunk),
                "C": sum(run.compute for run in runs),
                "tokens_cosine": sum(run.tokens for run in runs),
                "tokens_wsd": tokens_wsd,
                "gpu_hours_cosine": sum(gpu_hours(config, run) for run in runs),
                "gpu_hours_wsd": gpu_hours(config, trunk, tokens_wsd),
                "max_runtime_h": max(job["runtime"] for job in jobs) / 60,
            }
        )
    sums = ["runs", "C", "tokens_cosine", "tokens_wsd", "gpu_hours_cosine", "gpu_hours_wsd"]
    table = (
        pd.DataFrame(rows)
        .groupby(["size", "N"], sort=False)
        .agg({**dict.fromkeys(sums, "sum"), "gpus_per_job": "max", "max_runtime_h": "max"})
        .reset_index()
    )
    total = {"size": "total", **table[sums].sum().to_dict()}
    table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
    columns = ["size", "N", "runs", "gpus_per_job", "C", *sums[2:], "max_runtime_h"]
    return table[columns].astype({"runs": int})


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
                "tokens_cosine": "{:.3g}".format,
                "tokens_wsd": "{:.3g}".format,
                "gpu_hours_cosine": "{:,.1f}".format,
                "gpu_hours_wsd": "{:,.1f}".format,
                "max_runtime_h": "{:,.1f}".format,
            },
        )
    )
    total = table.iloc[-1]
    train = config["train"]
    print(
        f"\nschedule: {train['schedule']} (max_runtime_h is its longest job). wsd (a trunk per "
        f"dataset and size, cooldown_fraction {train['cooldown_fraction']}) trains "
        f"{1 - total['tokens_wsd'] / total['tokens_cosine']:.0%} fewer tokens than cosine: "
        f"{total['gpu_hours_wsd']:,.1f} GPU-hours instead of {total['gpu_hours_cosine']:,.1f}."
    )


if __name__ == "__main__":
    main()
