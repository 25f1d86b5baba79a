"""Faults injected into real stages: each case breaks one thing the way a cluster or a person
does (a kill, of a run, a trunk or a run growing its trunk; a second trainer, a truncated
file, a deleted one, a diverging run) and checks that nothing is lost and nothing wrong passes
for finished.

The stages are called directly on tiny shapes, or started as their command lines where a
kill or a second process is the fault; no Snakemake run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_downstream import RUN, offline_suite  # noqa: F401 (a fixture)
from test_model import make_shape
from test_train import (
    OUTPUTS,
    REPO,
    TOKENS_PER_STEP,
    checkpoint_weights,
    data,  # noqa: F401 (a fixture)
    make_engine,
    make_spec,
    run_outputs,
    run_train,
    saved_step,
    train_command,
)
from transformers import AutoTokenizer

from workflow import downstream, evaluate, train, trunk
from workflow.errors import TrainError
from workflow.evaluate import evaluate_checkpoint
from workflow.model import build_model
from workflow.paths import trunk_state_steps
from workflow.prepare import prepare
from workflow.settings import Cooldown, TrunkSpec
from workflow.shards import write_shards
from workflow.tokenization import save_tokenizer
from workflow.trunk import TrunkStates

pytestmark = pytest.mark.faults

STEPS = 200
# Four checkpoints, a resume state every 10 steps and a log line every step, which the
# kills below are timed by.
SPEC = make_spec(STEPS * TOKENS_PER_STEP, checkpoint_steps=[50, 100, 150, 200])
ENGINE = make_engine(resume_every=10, log_every=1)
KILL_STEPS = sorted(random.Random(18).sample(range(12, STEPS - 10), 3))
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:  # noqa: F811
    """The run trained once without a fault: what every faulted run must end up equal to."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_train(SPEC, data, run_dir, ENGINE)
    return run_dir


def assert_complete_and_equal(run_dir: Path, reference_dir: Path) -> None:
    """The run's outputs and nothing else, every checkpoint, bitwise the reference's."""
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(OUTPUTS)
    weights, expected = checkpoint_weights(run_dir), checkpoint_weights(reference_dir)
    assert list(weights) == [f"step{step:06d}" for step in SPEC.checkpoint_steps]
    for step, tensors in expected.items():
        assert weights[step].keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert torch.equal(weights[step][name], tensor), (step, name)
    columns = ["step", "tokens", "loss", "lr"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_dir / "curve.parquet")[columns],
        pd.read_parquet(reference_dir / "curve.parquet")[columns],
        check_exact=True,
    )


def start_trainer(run_dir: Path, data: dict) -> subprocess.Popen:  # noqa: F811
    """The train stage's command line on ``SPEC``, its log readable line by line."""
    return subprocess.Popen(
        train_command(SPEC, data, run_dir, ENGINE),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENVIRONMENT,
    )


def wait_for_step(trainer: subprocess.Popen, step: int) -> None:
    """Read the trainer's log until it has logged ``step`` (or a later one)."""
    for line in trainer.stderr:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return
    raise AssertionError(f"the trainer ended before step {step}: {trainer.wait()}")


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


@pytest.mark.parametrize("kill_step", KILL_STEPS, ids=lambda step: f"sigkill-at-step-{step}")
def test_a_trainer_killed_at_a_random_step_resumes_to_the_uninterrupted_result(
    data,  # noqa: F811
    reference,
    tmp_path,
    capfd,
    kill_step,
):
    """SIGKILL (no handler runs) leaves the lock file, a resume state and the checkpoints so
    far; the next trainer takes the dead one's lock over, resumes and ends bitwise equal to
    the run that was never killed, with every checkpoint."""
    run_dir = tmp_path / "run"
    trainer = start_trainer(run_dir, data)
    wait_for_step(trainer, kill_step)
    trainer.kill()
    trainer.wait()
    assert trainer.returncode == -signal.SIGKILL
    assert not any((run_dir / name).exists() for name in OUTPUTS)
    assert json.loads((run_dir / "work" / "lock").read_text())["pid"] == trainer.pid
    killed_at = saved_step(run_dir / "work" / "resume.pt")
    assert kill_step - 10 <= killed_at < STEPS

    capfd.readouterr()
    run_train(SPEC, data, run_dir, ENGINE)
    assert f"resuming at step {killed_at}/{STEPS}" in capfd.readouterr().err
    assert_complete_and_equal(run_dir, reference)


def test_a_second_trainer_of_a_running_run_is_refused_and_the_first_completes(
    data,  # noqa: F811
    reference,
    tmp_path,
):
    """As when Snakemake, killed and restarted, starts a trainer for a run whose orphaned
    trainer still runs: the second is refused, naming the first, and touches nothing. The
    first is stopped (SIGSTOP) meanwhile, so that it surely still holds the run."""
    run_dir = tmp_path / "run"
    first = start_trainer(run_dir, data)
    wait_for_step(first, 60)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(
            train_command(SPEC, data, run_dir, ENGINE),
            capture_output=True,
            text=True,
            env=ENVIRONMENT,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(
        f"error: toy/xs/M20: another trainer is training this run (pid {first.pid} on host "
        f"{socket.gethostname()}, since "
    )
    assert f"and holds {run_dir / 'work' / 'lock'}" in message
    assert f"stop it (`kill {first.pid}` on {socket.gethostname()})" in message
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert_complete_and_equal(run_dir, reference)


# train.schedule wsd: a trunk kept at two branch points, and a run that branches at the second.
TRUNK = TrunkSpec.of_run(SPEC, "toy/xs")
BRANCH_STEPS = (60, 150)
WSD_SPEC = dataclasses.replace(SPEC, checkpoint_steps=[175, STEPS])
COOLDOWN = Cooldown(trunk="toy/xs", branch_step=150, decay="1-sqrt")


def trunk_command(data: dict, states: Path, summary: Path) -> list[str]:  # noqa: F811
    """The trunk stage's command line, as rules/train.smk writes it."""
    return [
        sys.executable,
        "-m",
        "workflow.trunk",
        "--spec",
        TRUNK.to_json(),
        "--branch-steps",
        json.dumps(BRANCH_STEPS),
        "--engine",
        ENGINE.to_json(),
        "--threads",
        "1",
        "--data",
        str(data["tokens"]),
        "--states",
        str(states),
        "--summary",
        str(summary),
    ]


def assert_same_state(path: Path, reference: Path) -> None:
    """Two saved training states hold bitwise the same weights, optimizer state and curve."""
    state = torch.load(path, weights_only=False)
    expected = torch.load(reference, weights_only=False)
    assert state["spec_hash"] == expected["spec_hash"]
    for part in ("model", "optimizer"):
        flat, flat_expected = flatten(state[part]), flatten(expected[part])
        assert flat.keys() == flat_expected.keys()
        for key, value in flat_expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(flat[key], value), (path, key)
            else:
                assert flat[key] == value, (path, key)
    columns = ["step", "tokens", "loss", "lr"]
    rows = [[row[column] for column in columns] for row in state["progress"]["curve"]]
    assert rows == [[row[column] for column in columns] for row in expected["progress"]["curve"]]


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {
            key: value
            for name, subtree in tree.items()
            for key, value in flatten(subtree, f"{prefix}/{name}").items()
        }
    if isinstance(tree, list | tuple):
        return {
            key: value
            for index, item in enumerate(tree)
            for key, value in flatten(item, f"{prefix}/{index}").items()
        }
    return {prefix: tree}


@pytest.fixture(scope="module")
def trunk_reference(data, tmp_path_factory) -> TrunkStates:  # noqa: F811
    """The trunk grown once without a fault."""
    root = tmp_path_factory.mktemp("trunk-reference")
    states = TrunkStates(root / "states", BRANCH_STEPS)
    trunk.grow(TRUNK, ENGINE, data["tokens"], states, root / "trunk.json", threads=1)
    return states


@pytest.mark.parametrize("kill_step", [35, 110], ids=lambda step: f"sigkill-at-step-{step}")
def test_a_trunk_killed_at_a_random_step_resumes_to_the_same_states(
    data,  # noqa: F811
    trunk_reference,
    tmp_path,
    capfd,
    kill_step,
):
    """Killed before or after its first branch point, the trunk's next job continues from
    its resume state (not step 0) and keeps states bitwise equal to the uninterrupted ones."""
    states = TrunkStates(tmp_path / "states", BRANCH_STEPS)
    trunk_job = subprocess.Popen(
        trunk_command(data, states.directory, tmp_path / "trunk.json"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENVIRONMENT,
    )
    wait_for_step(trunk_job, kill_step)
    trunk_job.kill()
    trunk_job.wait()
    assert not (tmp_path / "trunk.json").exists()
    killed_at = saved_step(states.resume_state)
    assert kill_step - 10 <= killed_at <= kill_step + 1
    capfd.readouterr()
    summary = trunk.grow(TRUNK, ENGINE, data["tokens"], states, tmp_path / "trunk.json", 1)
    target = 60 if killed_at < 60 else 150
    assert (
        f"toy/xs/trunk: training from step {killed_at} to step {target}" in capfd.readouterr().err
    )
    assert summary["trained_steps"] == [[killed_at, 150]]
    assert trunk_state_steps(states.directory) == list(BRANCH_STEPS)
    for step in BRANCH_STEPS:
        assert_same_state(states.state(step), trunk_reference.state(step))


@pytest.mark.parametrize("phase", ["growing-its-trunk", "in-its-cooldown"])
def test_a_wsd_run_killed_while_growing_its_trunk_or_cooling_resumes_to_the_same_run(
    data,  # noqa: F811
    trunk_reference,
    tmp_path,
    capfd,
    phase,
):
    """A run added after its trunk grows it from step 60 to its branch point 150, then decays;
    killed in either part, its next job continues where the kill left it and ends bitwise
    equal to the run trained alone."""
    growing = phase == "growing-its-trunk"
    states = TrunkStates(tmp_path / "states", BRANCH_STEPS)
    shutil.copytree(trunk_reference.directory, states.directory)
    if growing:
        states.state(150).unlink()
    kill_step = 100 if growing else 180
    resume = states.resume_state if growing else tmp_path / "run" / "work" / "resume.pt"
    command = train_command(WSD_SPEC, data, tmp_path / "run", ENGINE)
    command += ["--cooldown", COOLDOWN.to_json(), "--trunk-states", str(states.directory)]
    command += ["--branch-steps", json.dumps(BRANCH_STEPS)]
    job = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT
    )
    wait_for_step(job, kill_step)
    job.kill()
    job.wait()
    killed_at = saved_step(resume)
    assert kill_step - 10 <= killed_at <= kill_step + 1
    capfd.readouterr()
    run_dir, alone = tmp_path / "run", tmp_path / "alone"
    outputs = run_outputs(run_dir)
    train.train(WSD_SPEC, ENGINE, data["tokens"], data["tokenizer"], outputs, 1, COOLDOWN, states)
    log = capfd.readouterr().err
    if growing:
        assert f"toy/xs/trunk: training from step {killed_at} to step 150" in log
    else:
        assert f"resuming at step {killed_at}/{STEPS}" in log
    outputs = run_outputs(alone)
    train.train(WSD_SPEC, ENGINE, data["tokens"], data["tokenizer"], outputs, 1, COOLDOWN, None)
    weights, expected = checkpoint_weights(run_dir), checkpoint_weights(alone)
    assert list(weights) == ["step000175", "step000200"]
    for step, tensors in expected.items():
        for name, tensor in tensors.items():
            assert torch.equal(weights[step][name], tensor), (step, name)
    columns = ["step", "tokens", "loss", "lr"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_dir / "curve.parquet")[columns],
        pd.read_parquet(alone / "curve.parquet")[columns],
        check_exact=True,
    )


def test_a_run_whose_loss_turns_non_finite_stops_naming_the_step(data, tmp_path, capfd):  # noqa: F811
    spec = make_spec(40 * TOKENS_PER_STEP, lr=1e3)
    with pytest.raises(TrainError, match=r"diverged: the training loss is nan at step 10;"):
        run_train(spec, data, tmp_path)
    assert "DIVERGED: toy/xs/M20: the training loss is nan at step 10" in capfd.readouterr().err
    assert not any((tmp_path / name).exists() for name in OUTPUTS)


def test_a_run_whose_loss_rises_late_is_marked_diverged(data, tmp_path, capfd):  # noqa: F811
    """The last 40% of the stream is random ids, read last (in stream order): the loss climbs
    from its low to ln(256) and beyond. The run finishes, says DIVERGED in its log and in its
    summary."""
    stream = data["stream"].copy()
    cut = 60 * TOKENS_PER_STEP
    stream[cut:] = np.random.default_rng(1).integers(0, 256, stream.size - cut)
    write_shards(tmp_path / "tokens", [stream], vocab_size=256, eot_id=1)
    spec = make_spec(100 * TOKENS_PER_STEP, data_order="contiguous")
    summary = run_train(spec, {**data, "tokens": tmp_path / "tokens"}, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "train.json").read_text())
    assert written["diverged"] is True
    assert written["divergence_reason"].startswith(
        "the mean training loss of the last tenth of the tokens (steps 91-100) is "
    )
    assert f"DIVERGED: toy/xs/M20: {written['divergence_reason']}" in capfd.readouterr().err
    assert summary == written


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        ("fewer-tokens", "it has 2,000 bytes"),
        ("odd-byte-count", "it has 13,999 bytes"),
        ("missing", "it is missing"),
    ],
    ids=["fewer-tokens", "odd-byte-count", "missing"],
)
def test_a_damaged_token_shard_is_named_with_its_sizes_and_how_to_rebuild_it(
    data,  # noqa: F811
    tmp_path,
    damage,
    found,
):
    """A shard of 7,000 uint16 ids cut short, cut to an odd byte count, or deleted: the
    trainer names the file, both sizes and the command that rebuilds the shards, not a
    shortfall of data (there is plenty) or a numpy traceback."""
    tokens = tmp_path / "tokens"
    shutil.copytree(data["tokens"], tokens)
    shard = tokens / "00003.bin"
    if damage == "missing":
        shard.unlink()
    else:
        os.truncate(shard, {"fewer-tokens": 2000, "odd-byte-count": 13999}[damage])
    command = train_command(make_spec(20 * TOKENS_PER_STEP), {**data, "tokens": tokens}, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        train.main(command[3:])
    assert str(exit_.value) == (
        f"error: token shard {shard} is damaged: meta.json lists 7,000 tokens (14,000 bytes of "
        f"uint16) but {found}. The shards come from the tokenize rule: rebuild them with "
        f"`snakemake --forcerun {tokens}` (or delete {tokens} and re-run snakemake)"
    )
    assert not (tmp_path / "work").exists()


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A tiny model's checkpoint where a run keeps it, and a validation shard for it."""
    directory = tmp_path / "runs" / "toy" / "xs" / "M20" / "checkpoints" / "step000010"
    torch.manual_seed(0)
    build_model(make_shape(vocab_size=64, context_length=8)).save_pretrained(directory)
    ids = np.random.default_rng(0).integers(0, 64, 200)
    write_shards(tmp_path / "val", [ids], vocab_size=64, eot_id=0)
    return directory


@pytest.mark.parametrize(
    ("stage", "removed"),
    [
        ("evaluate", "model.safetensors"),
        ("evaluate", "config.json"),
        ("evaluate", "the folder"),
        ("downstream", "model.safetensors"),
    ],
    ids=["evaluate-without-weights", "evaluate-without-config", "evaluate-no-folder", "downstream"],
)
def test_an_incomplete_checkpoint_is_named_before_it_is_loaded(
    checkpoint,
    offline_suite,  # noqa: F811
    tmp_path,
    stage,
    removed,
):
    if removed == "the folder":
        shutil.rmtree(checkpoint)
        problem = "does not exist"
    else:
        (checkpoint / removed).unlink()
        problem = f"is incomplete: {removed} missing"
    arguments = ["--checkpoint", str(checkpoint), "--run", json.dumps(RUN)]
    arguments += ["--batch-size", "4", "--device", "cpu", "--threads", "1"]
    if stage == "evaluate":
        outputs = {"val": str(tmp_path / "loss-val.json")}
        arguments += ["--validation", json.dumps({"val": str(tmp_path / "val")})]
        arguments += ["--outputs", json.dumps(outputs), "--max-tokens", "80", "--bootstrap", "10"]
        prefix, main = "evaluate_loss", evaluate.main
    else:
        _, suite_dir, _ = offline_suite
        arguments += ["--suite", str(suite_dir), "--summary", str(tmp_path / "summary.json")]
        arguments += ["--results", str(tmp_path / "lm-eval.json")]
        prefix, main = "evaluate_downstream", downstream.main
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    checkpoints = checkpoint.parent
    assert str(exit_.value) == (
        f"{prefix}: checkpoint {checkpoint} {problem}. A run's checkpoints come from its "
        f"training: retrain the run with `snakemake --forcerun {checkpoints}` (or delete "
        f"{checkpoints} and re-run snakemake)"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs", "suite", "val", "val.jsonl"]


def leave_temporaries(final: Path, pid: int, live_pid: int) -> tuple[Path, Path]:
    """A killed writer's temporary of ``final`` (a folder with a file, as a killed prepare
    leaves one) and a live writer's, which must stay."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stale = final.with_name(f".{final.name}.tmp-{pid}")
    stale.mkdir()
    (stale / "part").write_bytes(b"\0" * 4096)
    live = final.with_name(f".{final.name}.tmp-{live_pid}")
    live.write_text("another writer's work in progress")
    return stale, live


def run_stage(stage: str, root: Path, data: dict) -> list[Path]:  # noqa: F811
    """Run ``stage`` into ``root`` as its rule would; the outputs it wrote."""
    if stage == "prepare":
        documents = root / "documents.jsonl"
        documents.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
        source = {"kind": "files", "paths": [str(documents)]}
        prepare("mine", source, 0.2, root / "corpus" / "mine", root / "cache")
        return [root / "corpus" / "mine"]
    if stage == "tokenizer":
        save_tokenizer(AutoTokenizer.from_pretrained(data["tokenizer"]), root / "tokenizer")
        return [root / "tokenizer"]
    if stage == "tokenize":
        write_shards(root / "tokens" / "train", [np.arange(100)], vocab_size=256, eot_id=1)
        return [root / "tokens" / "train"]
    if stage == "train":
        run_train(make_spec(10 * TOKENS_PER_STEP), data, root / "run")
        return [root / "run" / name for name in OUTPUTS]
    build_model(make_shape(vocab_size=64, context_length=8)).save_pretrained(root / "model")
    write_shards(root / "val", [np.arange(100) % 64], vocab_size=64, eot_id=0)
    output = root / "eval" / "loss-val.json"
    evaluate_checkpoint(
        root / "model", {"val": root / "val"}, {"val": output}, {}, 80, 10, 4, "cpu"
    )
    return [output]


@pytest.mark.parametrize("stage", ["prepare", "tokenizer", "tokenize", "train", "evaluate"])
def test_a_temporary_left_by_a_killed_stage_is_removed_by_its_next_run(
    data,  # noqa: F811
    tmp_path,
    stage,
):
    """A SIGKILL skips ``atomic_path``'s cleanup and leaves ``.NAME.tmp-PID`` beside the
    output; the stage's next run removes those of dead processes, and only those."""
    finals = {
        "prepare": tmp_path / "corpus" / "mine",
        "tokenizer": tmp_path / "tokenizer",
        "tokenize": tmp_path / "tokens" / "train",
        "train": tmp_path / "run" / "checkpoints",
        "evaluate": tmp_path / "eval" / "loss-val.json",
    }
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            stale, live = leave_temporaries(finals[stage], dead_pid(), sleeper.pid)
            outputs = run_stage(stage, tmp_path, data)
        finally:
            sleeper.kill()
    assert all(output.exists() for output in outputs)
    assert not stale.exists()
    assert live.exists()


def test_an_unreachable_hub_says_how_to_build_the_paper_suite_elsewhere(tmp_path):
    """`suite: paper17` offline: the build fails with where to build it and what to copy,
    not a traceback (the hub points at a closed local port, so this holds with network too)."""
    settings = {"suite": "paper17", "tasks": {}, "sources": {}, "examples": 10, "seed": 0}
    environment = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    command = [sys.executable, "-m", "workflow.suite", "--settings", json.dumps(settings)]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "suite")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("build_suite: the paper17 suite fetches its datasets")
    assert "README" in last and "results/paper/suites/paper17" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "suite").exists()
