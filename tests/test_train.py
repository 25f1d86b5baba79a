"""The train stage for real on a tiny model: exact token accounting, resuming, outputs."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from workflow.model import build_model
from workflow.runs import checkpoint_steps, count_parameters, ffn_hidden_size
from workflow.shards import TokenShards, write_shards
from workflow.train import (
    IGNORE_INDEX,
    Batch,
    OutputLoss,
    StepSettings,
    TrainError,
    learning_rate,
    make_optimizer,
    read_batch,
    train,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256
SHAPE = {
    "d_model": 16,
    "n_layers": 1,
    "n_heads": 2,
    "ffn_hidden": ffn_hidden_size(16, 8),
    "vocab_size": VOCAB,
    "context_length": 16,
    "rope_theta": 10000.0,
    "norm_eps": 1e-5,
}
BATCH_SIZE = 8
TOKENS_PER_STEP = BATCH_SIZE * SHAPE["context_length"]
OUTPUTS = ("checkpoints", "curve.parquet", "train.json")


def make_spec(tokens: int, **overrides) -> dict:
    """A complete train spec (as rules/common.smk builds it) for the tiny shape."""
    steps = math.ceil(tokens / TOKENS_PER_STEP)
    spec = {
        "run": "toy/xs/M20",
        "shape": SHAPE,
        "n_params": count_parameters(16, 1, VOCAB, SHAPE["ffn_hidden"]),
        "tokens": tokens,
        "checkpoint_steps": list(checkpoint_steps(steps, 2)),
        "batch_size": BATCH_SIZE,
        "micro_batch_size": None,
        "lr": 0.01,
        "warmup": 5,
        "weight_decay": 0.033,
        "min_lr": 3e-5,
        "z_loss": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "grad_clip": 1.0,
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "log_every": 10,
        "resume_every": 1000,
    }
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A token shard directory of 100k ids (a noisy repeating pattern) and a tokenizer."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    stream = np.resize(rng.integers(0, VOCAB, 97), 100_000)
    noisy = rng.random(stream.size) < 0.1
    stream[noisy] = rng.integers(0, VOCAB, noisy.sum())
    # Small shards, so that sequences cross shard boundaries.
    write_shards(root / "tokens", [stream], vocab_size=VOCAB, eot_id=1, shard_tokens=7_000)
    word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="t1")
    tokenizer.save_pretrained(root / "tokenizer")
    return {"tokens": root / "tokens", "tokenizer": root / "tokenizer", "stream": stream}


def run_train(spec: dict, data: dict, out_dir: Path) -> dict:
    return train(spec, data["tokens"], data["tokenizer"], out_dir)


def train_command(spec: dict, data: dict, out_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workflow.train",
        "--spec",
        json.dumps(spec),
        "--data",
        str(data["tokens"]),
        "--tokenizer",
        str(data["tokenizer"]),
        "--out-dir",
        str(out_dir),
    ]


def test_batches_cover_exactly_the_first_d_tokens_in_order(data):
    """Concatenated targets are stream ids 1..D, inputs 0..D-1; a short last step and sequence."""
    shards = TokenShards(data["tokens"])
    tokens = 5 * TOKENS_PER_STEP + 3 * SHAPE["context_length"] + 5
    inputs, targets = [], []
    for step in range(math.ceil(tokens / TOKENS_PER_STEP)):
        step_inputs, step_targets, n_targets = read_batch(
            shards, step, BATCH_SIZE, SHAPE["context_length"], tokens
        )
        counted = step_targets != IGNORE_INDEX
        assert counted.sum() == n_targets
        inputs.append(step_inputs[counted])
        targets.append(step_targets[counted])
    assert len(step_inputs) == 4  # 3 full sequences and one of 5 tokens
    stream = data["stream"]
    np.testing.assert_array_equal(np.concatenate(inputs), stream[:tokens])
    np.testing.assert_array_equal(np.concatenate(targets), stream[1 : tokens + 1])


def test_run_consumes_exactly_d_tokens(data, tmp_path):
    tokens = 30 * TOKENS_PER_STEP + 21  # partial last batch and partial last sequence
    spec = make_spec(tokens)
    summary = run_train(spec, data, tmp_path)
    written = json.loads((tmp_path / "train.json").read_text())
    curve = pd.read_parquet(tmp_path / "curve.parquet")
    assert summary == written
    assert written["tokens"] == tokens
    assert written["steps"] == 31 == spec["checkpoint_steps"][-1]
    assert list(curve.columns) == ["step", "tokens", "loss", "lr", "tokens_per_s", "elapsed_s"]
    assert curve["step"].tolist() == [10, 20, 30, 31]
    assert curve["tokens"].iloc[-1] == tokens
    assert curve["lr"].iloc[-1] == pytest.approx(spec["min_lr"])
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(OUTPUTS)
    steps = [int(path.name[4:]) for path in sorted((tmp_path / "checkpoints").iterdir())]
    assert steps == spec["checkpoint_steps"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step000031")
    assert final.config.max_position_embeddings == SHAPE["context_length"]
    assert (tmp_path / "checkpoints" / "step000031" / "tokenizer.json").exists()


def test_too_little_data_fails_up_front_naming_the_shortfall(data, tmp_path):
    spec = make_spec(200_000)
    with pytest.raises(TrainError) as error:
        run_train(spec, data, tmp_path)
    message = str(error.value)
    assert "toy/xs/M20" in message
    assert "200,001" in message and "100,000" in message and "short by 100,001" in message
    assert not tmp_path.joinpath("work").exists()


def test_parameter_count_mismatch_is_refused(data, tmp_path):
    spec = make_spec(TOKENS_PER_STEP, n_params=123)
    with pytest.raises(TrainError, match="n_params = 123"):
        run_train(spec, data, tmp_path)


def test_micro_batches_give_the_same_step_as_the_whole_batch():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH_SIZE, SHAPE["context_length"] + 1))
    targets = ids[:, 1:].clone()
    targets[-1, 5:] = IGNORE_INDEX  # a short last sequence
    batch = Batch(ids[:, :-1], targets, int((targets != IGNORE_INDEX).sum()))
    results = []
    for micro_batch_size in (BATCH_SIZE, 3):
        torch.manual_seed(1)
        model = build_model(SHAPE)
        optimizer = make_optimizer(model, make_spec(1), torch.device("cpu"))
        settings = StepSettings(micro_batch_size, 1e-4, 1.0, torch.device("cpu"))
        loss = train_step(model, optimizer, batch, 0.01, settings)
        results.append((loss, [parameter.detach().clone() for parameter in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for whole, micro in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(whole, micro)


def test_output_loss_matches_autograd_reference():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 37))
    targets[1, 30:] = IGNORE_INDEX
    objective, cross_entropy = OutputLoss.apply(hidden, weight, targets, 1e-2, 10)
    objective.backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = (hidden @ weight.T).flatten(0, 1)
    flat_targets = targets.flatten()
    counted = flat_targets != IGNORE_INDEX
    reference_ce = torch.nn.functional.cross_entropy(logits, flat_targets, reduction="sum")
    reference = reference_ce + 1e-2 * torch.logsumexp(logits[counted], -1).square().sum()
    reference.backward()
    torch.testing.assert_close(cross_entropy, reference_ce.detach())
    torch.testing.assert_close(objective, reference.detach())
    torch.testing.assert_close(fused_grads[0], hidden.grad)
    torch.testing.assert_close(fused_grads[1], weight.grad)


def test_learning_rate_warms_up_linearly_then_decays_to_the_floor():
    rates = [learning_rate(step, 100, 1e-2, 10, 1e-4) for step in range(1, 101)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[9] == pytest.approx(1e-2)
    assert rates[-1] == pytest.approx(1e-4)
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates[9:]))


def wait_for(condition, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killed_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    """SIGKILL after a resume state exists: no outputs; a rerun reproduces the full run."""
    spec = make_spec(300 * TOKENS_PER_STEP - 7, resume_every=25, log_every=25)
    killed_dir = tmp_path / "killed"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        train_command(spec, data, killed_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    wait_for((killed_dir / "work" / "resume.pt").exists, process)
    process.kill()
    process.wait()
    assert not any((killed_dir / name).exists() for name in OUTPUTS)

    resumed = run_train(spec, data, killed_dir)
    uninterrupted = run_train(spec, data, tmp_path / "uninterrupted")
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], abs=1e-6)
    resumed_curve = pd.read_parquet(killed_dir / "curve.parquet")
    full_curve = pd.read_parquet(tmp_path / "uninterrupted" / "curve.parquet")
    columns = ["step", "tokens", "loss", "lr"]
    pd.testing.assert_frame_equal(resumed_curve[columns], full_curve[columns])
    assert not (killed_dir / "work").exists()


def test_sigterm_saves_a_resume_state_and_a_changed_spec_starts_over(data, tmp_path, capfd):
    spec = make_spec(300 * TOKENS_PER_STEP)
    process = subprocess.Popen(
        train_command(spec, data, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    for line in process.stderr:
        if line.startswith("step "):
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, rest
    assert "stopped by signal" in rest
    state = torch.load(tmp_path / "work" / "resume.pt", weights_only=False)
    assert 10 <= state["progress"]["step"] < 300
    assert not any((tmp_path / name).exists() for name in OUTPUTS)

    changed = make_spec(20 * TOKENS_PER_STEP)
    run_train(changed, data, tmp_path)
    assert "discarding the resume state of a different spec" in capfd.readouterr().err
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 20
