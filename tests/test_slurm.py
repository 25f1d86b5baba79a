"""`snakemake --profile slurm` on a real one-node Slurm cluster (tests/slurm/start-cluster.sh).

The module starts the cluster once (as root), runs the tiny config through sbatch, and then
checks what a cluster adds to the local guarantees: a changed size submits only its own jobs
again, and a cancelled training job is reported with its logs, leaves nothing that looks
finished, and continues from its resume state when Snakemake runs again. Where the cluster
cannot be started the module skips, except under CI=true, where that is a failure.

Each Slurm job costs ~10 s of scheduling and Snakemake start-up: the module takes minutes.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, load_config, snakemake_command, snakemake_environment

from workflow.config import validate_config
from workflow.resources import downstream_resources, evaluate_resources, train_resources
from workflow.runs import find_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPTS = REPO / "tests" / "slurm"
# The project's profile, then only what the test cluster needs on top of it.
PROFILES = (REPO / "slurm", SCRIPTS / "profile")
SLURM_ROOT = Path(os.environ.get("SLURM_ROOT", "/tmp/scaling-lab-slurm"))
GPU_RULES = {"train", "evaluate_loss", "evaluate_downstream"}
DERIVE = {
    "train": train_resources,
    "evaluate_loss": evaluate_resources,
    "evaluate_downstream": downstream_resources,
}
DATA_RULES = {"prepare", "tokenizer", "tokenize", "build_suite"}
# A Snakemake that never hears back from Slurm would block CI forever: kill it instead.
SNAKEMAKE_TIMEOUT_S = 900


@dataclass
class Job:
    """One Snakemake job of a run: its rule, wildcards and the Slurm jobs that ran it."""

    rule: str
    wildcards: dict[str, str]
    local: bool
    slurm_ids: list[int] = field(default_factory=list)
    slurm_log: str | None = None


@dataclass
class SnakemakeRun:
    """What one `snakemake` invocation printed, parsed into its jobs."""

    returncode: int
    output: str
    run_id: str | None
    jobs: list[Job]

    @property
    def submitted(self) -> list[Job]:
        return [job for job in self.jobs if job.slurm_ids]

    def rules(self, submitted: bool = True) -> set[str]:
        return {job.rule for job in (self.submitted if submitted else self.jobs)}


def parse_snakemake_output(output: str) -> SnakemakeRun:
    """Jobs from the `rule x:` / `localrule x:` blocks and the plugin's submission lines."""
    jobs: dict[int, Job] = {}
    for block in re.finditer(r"^(local)?rule (\w+):\n((?:[ \t]+.*\n)*)", output, re.M):
        body = block.group(3)
        jobid = re.search(r"^\s+jobid: (\d+)$", body, re.M)
        wildcards = re.search(r"^\s+wildcards: (.*)$", body, re.M)
        if jobid:
            jobs[int(jobid.group(1))] = Job(
                rule=block.group(2),
                wildcards=dict(pair.split("=", 1) for pair in wildcards.group(1).split(", "))
                if wildcards
                else {},
                local=bool(block.group(1)),
            )
    pattern = r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$"
    for jobid, slurm_id, log in re.findall(pattern, output, re.M):
        jobs[int(jobid)].slurm_ids.append(int(slurm_id))
        jobs[int(jobid)].slurm_log = log
    run_id = re.search(r"^SLURM run ID: (\S+)$", output, re.M)
    return SnakemakeRun(0, output, run_id.group(1) if run_id else None, list(jobs.values()))


def start_snakemake(workdir: Path, config: dict, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `snakemake --profile slurm` on the tiny workflow in ``workdir``, in the background.

    Its output goes to a file (a pipe could fill up while the test polls the cluster).
    """
    log = workdir / f"snakemake-{time.monotonic_ns()}.log"
    profiles = (argument for profile in PROFILES for argument in ("--profile", str(profile)))
    command = snakemake_command(workdir, *profiles, *args, config=config)
    # The test runs inside no Slurm job: a SLURM_* variable would mislead the plugin.
    environment = {
        name: value
        for name, value in snakemake_environment().items()
        if not name.startswith("SLURM_")
    }
    with log.open("w") as stream:
        process = subprocess.Popen(
            command,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    return process, log


def finish_snakemake(process: subprocess.Popen, log: Path) -> SnakemakeRun:
    """Wait for a started Snakemake; kill it and its Slurm jobs if it outlives the timeout."""
    try:
        returncode = process.wait(timeout=SNAKEMAKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        run = parse_snakemake_output(log.read_text())
        if run.run_id:
            subprocess.run(["scancel", "--name", run.run_id], check=False)
        raise AssertionError(
            f"snakemake did not finish in {SNAKEMAKE_TIMEOUT_S} s:\n{run.output[-5000:]}"
        ) from None
    run = parse_snakemake_output(log.read_text())
    run.returncode = returncode
    return run


def snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> SnakemakeRun:
    run = finish_snakemake(*start_snakemake(workdir, config, *args))
    if check and run.returncode != 0:
        raise AssertionError(f"snakemake failed ({run.returncode}):\n{run.output[-8000:]}")
    return run


def slurm_jobs() -> dict[int, dict[str, str]]:
    """Every job slurmctld still knows (finished ones for MinJobAge), as its key=value fields."""
    listing = subprocess.run(
        ["scontrol", "show", "jobs", "--oneliner"], capture_output=True, text=True, check=True
    ).stdout
    jobs = {}
    for line in listing.splitlines():
        fields = dict(re.findall(r"(?:^|\s)([\w:]+)=(\S*)", line))
        if "JobId" in fields:
            jobs[int(fields["JobId"])] = fields
    return jobs


def controller_submissions() -> set[int]:
    """Job ids slurmctld logged as submitted through sbatch."""
    text = (SLURM_ROOT / "log" / "slurmctld.log").read_text()
    return {int(job) for job in re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text)}


def megabytes(memory: str) -> int:
    """Slurm's memory with its unit (5120M, 5G) as MB."""
    return int(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[memory[-1]]


def minutes(time_limit: str) -> int:
    """Slurm's [days-]hours:minutes:seconds as minutes."""
    days, _, clock = time_limit.rpartition("-")
    hours, mins, _ = (int(part) for part in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + mins


def run_of(config: dict, job: Job):
    wildcards = job.wildcards
    return find_run(config, wildcards["dataset"], wildcards["size"], wildcards["multiplier"])


def run_paths(workdir: Path, size: str) -> dict[str, Path]:
    results = workdir / "results"
    run = Path("wiki_en", size, "M20")
    return {
        "work": results / "runs" / run / "work",
        "outputs": results / "runs" / run,
        "train_log": results / "logs" / "train" / f"{run}.log",
    }


def cluster_unavailable() -> str | None:
    """Why this machine cannot host the test cluster, or None."""
    if not sys.platform.startswith("linux"):
        return "the test cluster needs Linux"
    if os.geteuid() != 0:
        return "the test cluster is started as root (it installs packages and starts daemons)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def run_script(name: str) -> subprocess.CompletedProcess:
    # The node advertises more than the machine has (nothing is enforced), so that the jobs
    # run side by side as on a real node: the profile asks 16 GB for a CPU job.
    environment = {
        **os.environ,
        "SLURM_ROOT": str(SLURM_ROOT),
        "NODE_CPUS": "4",
        "NODE_MEM_MB": "64000",
    }
    return subprocess.run(
        ["bash", str(SCRIPTS / name)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cluster():
    """A running test cluster for the module; stopped afterwards, whatever happened."""
    reason = cluster_unavailable()
    try:
        if reason is None:
            started = run_script("start-cluster.sh")
            if started.returncode != 0:
                reason = (
                    f"start-cluster.sh failed ({started.returncode}):\n"
                    + (started.stdout + started.stderr)[-3000:]
                )
        if reason is not None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI must run the Slurm tests, but: {reason}", pytrace=False)
            pytest.skip(f"no Slurm test cluster: {reason}")
        yield SLURM_ROOT
    finally:
        run_script("stop-cluster.sh")


@dataclass
class Pipeline:
    """The workdir the module's tests share, and the config its results were made with."""

    workdir: Path
    config: dict
    first_run: SnakemakeRun
    original: dict

    def with_other_lr(self, size: str) -> dict:
        """The config with a different lr for ``size``: half the original one, or back to it.

        Returning to the original keeps the fit stage on the losses it is known to fit.
        """
        changed = copy.deepcopy(self.config)
        original = self.original["sizes"][size]["lr"]
        current = changed["sizes"][size]["lr"]
        changed["sizes"][size]["lr"] = original / 2 if current == original else original
        return changed


@pytest.fixture(scope="module")
def pipeline(cluster, tmp_path_factory) -> Pipeline:
    """One complete `snakemake --profile slurm` of the tiny config."""
    workdir = tmp_path_factory.mktemp("slurm")
    config = copy.deepcopy(load_config("tests/configs/tiny.yaml"))
    config["results_dir"] = "results"
    # One checkpoint per run halves the evaluation jobs (~10 s of Slurm overhead each); the
    # trajectory of checkpoints is tested locally (test_pipeline.py).
    config["train"]["checkpoints"] = 1
    # A resume state every 20 steps, so that a cancelled run has one early on.
    config["train"]["resume_every"] = 20
    return Pipeline(workdir, config, snakemake(workdir, config), copy.deepcopy(config))


def test_the_tiny_config_runs_through_sbatch(pipeline):
    run = pipeline.first_run
    predictions = pd.read_parquet(pipeline.workdir / "results" / "predictions.parquet")
    assert len(predictions) and predictions["predicted"].notna().all()

    # Every job that is not a local rule went through sbatch, and slurmctld saw each one.
    remote = [job for job in run.jobs if not job.local and job.rule != "all"]
    assert remote and all(job.slurm_ids for job in remote), run.output[-5000:]
    assert run.rules() >= DATA_RULES | GPU_RULES
    assert not {job.rule for job in run.jobs if job.local} & (DATA_RULES | GPU_RULES)
    slurm_ids = [slurm_id for job in run.submitted for slurm_id in job.slurm_ids]
    assert set(slurm_ids) <= controller_submissions()

    cluster_jobs = slurm_jobs()
    config = validate_config(copy.deepcopy(pipeline.config))
    for job in run.submitted:
        (slurm_id,) = job.slurm_ids
        fields = cluster_jobs[slurm_id]
        assert fields["JobName"] == run.run_id
        assert fields["JobState"] == "COMPLETED"
        assert fields["Comment"].startswith(f"rule_{job.rule}")
        if job.rule in GPU_RULES:
            assert fields["Partition"] == "gpu" and fields["TresPerJob"] == "gres:gpu:1"
            expected = DERIVE[job.rule](config, run_of(config, job), 1)
            assert minutes(fields["TimeLimit"]) == expected["runtime"]
            assert megabytes(fields["MinMemoryNode"]) == expected["mem_mb"]
        else:
            assert fields["Partition"] == "cpu"


def test_changing_one_size_submits_only_its_jobs(pipeline):
    changed = pipeline.with_other_lr("s")
    run = snakemake(pipeline.workdir, changed)
    pipeline.config = changed

    gpu_jobs = [job for job in run.submitted if job.rule in GPU_RULES]
    assert {job.wildcards["size"] for job in gpu_jobs} == {"s"}
    n_runs = len(changed["grid"]["wiki_en"]["s"])
    counts = {rule: sum(job.rule == rule for job in gpu_jobs) for rule in GPU_RULES}
    assert counts == {
        "train": n_runs,
        "evaluate_loss": n_runs * changed["train"]["checkpoints"],
        "evaluate_downstream": n_runs,  # the tiny config's downstream.checkpoints: final
    }
    assert not run.rules() & DATA_RULES
    # downstream of the runs, locally or on the cluster
    assert {"aggregate", "fit"} <= run.rules(submitted=False)


def test_a_cancelled_training_is_reported_and_resumes(pipeline):
    """scancel a running training job: Snakemake reports it with the logs and keeps nothing of
    it; the next run submits it again and training continues from its resume state."""
    changed = pipeline.with_other_lr("s")
    paths = run_paths(pipeline.workdir, "s")
    # --retries 0: the failure must reach the user instead of being retried at once.
    process, log = start_snakemake(pipeline.workdir, changed, "--retries", "0")
    train_job = None
    deadline = time.monotonic() + SNAKEMAKE_TIMEOUT_S
    while train_job is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        started = parse_snakemake_output(log.read_text())
        submitted = [job for job in started.submitted if job.rule == "train"]
        if submitted and (paths["work"] / "resume.pt").exists():
            (train_job,) = submitted
    assert train_job is not None, f"training never got going:\n{log.read_text()[-5000:]}"
    (slurm_id,) = train_job.slurm_ids
    subprocess.run(["scancel", str(slurm_id)], check=True)
    run = finish_snakemake(process, log)

    assert run.returncode != 0
    assert f"SLURM-job '{slurm_id}' failed" in run.output
    assert train_job.slurm_log in run.output and Path(train_job.slurm_log).exists()
    assert str(paths["train_log"].relative_to(pipeline.workdir)) in run.output
    assert slurm_jobs()[slurm_id]["JobState"] == "CANCELLED"
    assert "stopped by signal" in paths["train_log"].read_text()
    # Nothing of the cancelled run looks finished, and the next run plans it again.
    for output in ("checkpoints", "curve.parquet", "train.json"):
        assert not (paths["outputs"] / output).exists()
    assert (paths["work"] / "resume.pt").exists()
    planned = snakemake(pipeline.workdir, changed, "--dry-run")
    planned_gpu = {
        (job.rule, job.wildcards["size"]) for job in planned.jobs if job.rule in GPU_RULES
    }
    assert planned_gpu == {("train", "s"), ("evaluate_loss", "s"), ("evaluate_downstream", "s")}

    resumed = snakemake(pipeline.workdir, changed)
    pipeline.config = changed
    assert [job.wildcards["size"] for job in resumed.submitted if job.rule == "train"] == ["s"]
    step = re.search(r"resuming at step (\d+)/", paths["train_log"].read_text())
    assert step and int(step.group(1)) > 0
    assert (paths["outputs"] / "train.json").exists()
    assert (pipeline.workdir / "results" / "predictions.parquet").exists()
