"""Data-parallel training for real: two CPU processes under torchrun (gloo) against one."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from test_train import (
    BATCH_SIZE,
    OUTPUTS,
    REPO,
    TOKENS_PER_STEP,
    checkpoint_weights,
    data,  # noqa: F401 (a fixture)
    make_engine,
    make_spec,
    run_train,
    saved_step,
    train_command,
)

from workflow.settings import EngineSettings, RunSpec


def torchrun(
    spec: RunSpec, engine: EngineSettings, data_dirs: dict, run_dir: Path, **popen
) -> subprocess.Popen:
    """The train stage's entry point under ``torchrun`` with 2 processes, as the rule
    launches it for a job with 2 GPUs."""
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node",
        "2",
        *train_command(spec, data_dirs, run_dir, engine)[1:],
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=environment, text=True, **popen)


def assert_same_weights(run_dir: Path, reference_dir: Path, rtol: float = 0.0) -> None:
    """Every checkpoint's every tensor equal to the reference run's: bitwise by default, or
    within ``rtol`` of its largest entry."""
    weights, reference = checkpoint_weights(run_dir), checkpoint_weights(reference_dir)
    assert weights.keys() == reference.keys()
    for step, tensors in reference.items():
        assert weights[step].keys() == tensors.keys()
        for name, tensor in tensors.items():
            scale = rtol * tensor.abs().max().item()
            torch.testing.assert_close(weights[step][name], tensor, rtol=0, atol=scale)


def test_two_processes_give_the_single_process_curve(data, tmp_path):  # noqa: F811
    """Same global batch, same data, same result: DDP over 2 gloo processes against one
    process that accumulates the same two halves of each batch as micro-batches.

    The tokens and learning rates are equal exactly, and so are the weights: each half's
    gradient is computed alike in both, the all-reduce's scaling by 2 and 1/2 is exact, and
    a sum of two terms does not depend on their order. The logged loss is summed within each
    process before the processes' sums are added, another order of float additions than one
    process's: it is compared at float32 precision. The last step is shorter than half a
    batch, so rank 1 has nothing to predict in it.
    """
    tokens = 40 * TOKENS_PER_STEP + 21
    spec, engine = make_spec(tokens), make_engine(log_every=5)
    two = torchrun(spec, engine, data, tmp_path / "two", stderr=subprocess.PIPE)
    _, log = two.communicate(timeout=300)
    assert two.returncode == 0, log[-5000:]
    assert "on 2 x cpu (ddp)" in log
    one_spec = dataclasses.replace(spec, micro_batch_size=BATCH_SIZE // 2)
    run_train(one_spec, data, tmp_path / "one", engine)

    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(OUTPUTS)
    assert json.loads((tmp_path / "two" / "train.json").read_text())["processes"] == 2
    assert_same_curve(tmp_path / "two", tmp_path / "one")
    assert_same_weights(tmp_path / "two", tmp_path / "one")


def assert_same_curve(run_dir: Path, reference_dir: Path) -> None:
    """Steps, tokens and learning rates equal; losses equal at float32 precision."""
    columns = ["step", "tokens", "loss", "lr"]
    curve = pd.read_parquet(run_dir / "curve.parquet")[columns]
    reference = pd.read_parquet(reference_dir / "curve.parquet")[columns]
    pd.testing.assert_frame_equal(curve, reference, check_exact=False, rtol=1e-6, atol=0)
    assert reference["loss"].iloc[-1] < reference["loss"].iloc[0]


def test_preempted_fsdp_job_resumes_in_one_process(data, tmp_path, capfd):  # noqa: F811
    """A 2-process FSDP job preempted after its first checkpoint: torchrun passes SIGTERM
    on, the processes agree on the step to stop after, and rank 0 saves the gathered, whole
    state. One plain process then finishes the run, and every checkpoint, the FSDP job's
    included, equals the uninterrupted one-process run's to float32 rounding: FSDP's
    reduce-scatter sums the gradients in another order than one process does (DDP above is
    bitwise)."""
    # Half the batch per forward pass: each FSDP process's share, and the one process's
    # micro-batch, so that both sum the same gradients in the same order.
    spec = make_spec(400 * TOKENS_PER_STEP, micro_batch_size=BATCH_SIZE // 2)
    engine = make_engine(parallelism="fsdp")
    assert spec.checkpoint_steps == [200, 400]
    run_dir = tmp_path / "preempted"
    job = torchrun(spec, engine, data, run_dir, stderr=subprocess.PIPE)
    head = []
    for line in job.stderr:
        head.append(line)
        if line.startswith("step 210/"):
            break
    job.send_signal(signal.SIGTERM)
    _, log = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "on 2 x cpu (fsdp)" in "".join(head)
    stopped_at = int(log.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert 210 <= stopped_at < 400
    assert saved_step(run_dir / "work" / "resume.pt") == stopped_at
    assert (run_dir / "work" / "checkpoints" / "step000200").is_dir()
    assert not any((run_dir / name).exists() for name in OUTPUTS)

    capfd.readouterr()
    run_train(spec, data, run_dir, engine)
    assert f"resuming at step {stopped_at}/400" in capfd.readouterr().err
    run_train(spec, data, tmp_path / "uninterrupted")
    assert_same_curve(run_dir, tmp_path / "uninterrupted")
    assert_same_weights(run_dir, tmp_path / "uninterrupted", rtol=1e-5)
