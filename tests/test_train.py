"""The train stage for real on a tiny model: exact token accounting, resuming, outputs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from workflow.config import validate_config
from workflow.device import flops_per_token, to_device
from workflow.distributed import Processes
from workflow.errors import TrainError
from workflow.model import IGNORE_INDEX, TrainingObjective, build_model
from workflow.resume import RESUME_FORMAT, spec_hash
from workflow.runs import checkpoint_steps, count_parameters, ffn_hidden_size, trained_runs
from workflow.settings import EngineSettings, RunSpec, engine_settings, run_spec
from workflow.shards import (
    DATA_ORDERS,
    TokenShards,
    read_batch,
    sequence_count,
    spread_stride,
    write_shards,
)
from workflow.step import Batch, StepSettings, learning_rate, make_optimizer, train_step
from workflow.telemetry import divergence
from workflow.train import Outputs, train

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


def make_spec(tokens: int, **overrides) -> RunSpec:
    """A complete run spec (as workflow.settings.run_spec builds it) for the tiny shape."""
    steps = math.ceil(tokens / TOKENS_PER_STEP)
    spec = RunSpec(
        run="toy/xs/M20",
        shape=SHAPE,
        n_params=count_parameters(16, 1, VOCAB, SHAPE["ffn_hidden"]),
        tokens=tokens,
        checkpoint_steps=list(checkpoint_steps(steps, 2)),
        batch_size=BATCH_SIZE,
        micro_batch_size=None,
        lr=0.01,
        warmup=5,
        weight_decay=0.033,
        min_lr=3e-5,
        z_loss=1e-4,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        seed=0,
        device="cpu",
        data_order="spread",
    )
    return dataclasses.replace(spec, **overrides)


def make_engine(**overrides) -> EngineSettings:
    """Engine settings (as workflow.settings.engine_settings builds them): one plain process."""
    engine = EngineSettings(
        activation_checkpointing=False,
        parallelism="ddp",
        compile=False,
        peak_tflops=None,
        resume_every=1000,
        log_every=10,
    )
    return dataclasses.replace(engine, **overrides)


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


def run_outputs(run_dir: Path) -> Outputs:
    """A run's outputs in ``run_dir`` under the names the train rule gives them."""
    return Outputs(
        checkpoints=run_dir / "checkpoints",
        curve=run_dir / "curve.parquet",
        summary=run_dir / "train.json",
        work=run_dir / "work",
    )


def run_train(
    spec: RunSpec, data: dict, run_dir: Path, engine: EngineSettings | None = None
) -> dict:
    engine = engine or make_engine()
    return train(spec, engine, data["tokens"], data["tokenizer"], run_outputs(run_dir), threads=1)


def train_command(
    spec: RunSpec, data: dict, run_dir: Path, engine: EngineSettings | None = None
) -> list[str]:
    """The train stage's command line, as rules/train.smk writes it."""
    outputs = run_outputs(run_dir)
    return [
        sys.executable,
        "-m",
        "workflow.train",
        "--spec",
        spec.to_json(),
        "--engine",
        (engine or make_engine()).to_json(),
        "--threads",
        "1",
        "--data",
        str(data["tokens"]),
        "--tokenizer",
        str(data["tokenizer"]),
        "--checkpoints",
        str(outputs.checkpoints),
        "--curve",
        str(outputs.curve),
        "--summary",
        str(outputs.summary),
        "--work",
        str(outputs.work),
    ]


def read_run(shards: TokenShards, tokens: int, world_size: int, order: str):
    """Every process's counted inputs and targets, by step then rank, and each process's
    (sequences, targets) share of every step."""
    inputs, targets, shares = [], [], []
    for step in range(math.ceil(tokens / TOKENS_PER_STEP)):
        for rank in range(world_size):
            step_inputs, step_targets, n_targets = read_batch(
                shards,
                step,
                BATCH_SIZE,
                SHAPE["context_length"],
                tokens,
                Processes(rank=rank, world_size=world_size),
                order,
            )
            counted = step_targets != IGNORE_INDEX
            inputs.append(step_inputs[counted])
            targets.append(step_targets[counted])
            shares.append((len(step_inputs), int(counted.sum())))
        assert sum(share for _, share in shares[-world_size:]) == n_targets
    return inputs, targets, shares


@pytest.mark.parametrize("order", DATA_ORDERS)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_batches_predict_exactly_d_targets_split_over_processes(data, world_size, order):
    """Every process's targets, concatenated by step then rank, are D targets, each once: in
    contiguous order stream ids 1..D (inputs 0..D-1); in spread order the order's first
    ceil(D / T) sequences, the last cut short. With a short last step and sequence, which
    leaves the last ranks nothing."""
    shards = TokenShards(data["tokens"])
    context = SHAPE["context_length"]
    tokens = 5 * TOKENS_PER_STEP + 3 * context + 5
    inputs, targets, shares = read_run(shards, tokens, world_size, order)
    # The last step: 3 full sequences and one of 5 tokens, split over the ranks in order;
    # a rank without a share gets one sequence with nothing to predict.
    expected_last = {1: [(4, 53)], 2: [(4, 53), (1, 0)], 4: [(2, 32), (2, 21), (1, 0), (1, 0)]}
    assert shares[-world_size:] == expected_last[world_size]
    stream = data["stream"]
    inputs, targets = np.concatenate(inputs), np.concatenate(targets)
    if order == "contiguous":
        np.testing.assert_array_equal(inputs, stream[:tokens])
        np.testing.assert_array_equal(targets, stream[1 : tokens + 1])
        return
    assert len(targets) == tokens
    total = sequence_count(shards, context)
    stride = spread_stride(total)
    expected = [
        stream[(index * stride % total) * context : (index * stride % total + 1) * context + 1]
        for index in range(math.ceil(tokens / context))
    ]
    expected[-1] = expected[-1][: 5 + 1]
    np.testing.assert_array_equal(inputs, np.concatenate([ids[:-1] for ids in expected]))
    np.testing.assert_array_equal(targets, np.concatenate([ids[1:] for ids in expected]))


@pytest.mark.parametrize("total", [1, 2, 6, 100, 6_249, 2**20])
def test_the_spread_order_visits_every_sequence_once_far_from_the_last(total):
    stride = spread_stride(total)
    visited = np.arange(total, dtype=np.int64) * stride % total
    assert np.array_equal(np.sort(visited), np.arange(total))
    if total >= 100:  # consecutive sequences lie at least a third of the stream apart
        gaps = np.abs(np.diff(visited))
        assert np.minimum(gaps, total - gaps).min() >= total // 3


def test_the_shard_module_imports_no_torch():
    """The tokenize stage writes shards in an environment without torch (envs/data.yaml);
    ``read_batch`` takes the model's IGNORE_INDEX only when the trainer calls it."""
    check = "import sys, workflow.shards; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_run_consumes_exactly_d_tokens(data, tmp_path):
    tokens = 30 * TOKENS_PER_STEP + 21  # partial last batch and partial last sequence
    spec = make_spec(tokens)
    summary = run_train(spec, data, tmp_path)
    written = json.loads((tmp_path / "train.json").read_text())
    curve = pd.read_parquet(tmp_path / "curve.parquet")
    assert summary == written
    assert written["tokens"] == tokens
    assert written["diverged"] is False and written["divergence_reason"] is None
    assert written["steps"] == 31 == spec.checkpoint_steps[-1]
    assert list(curve.columns) == [
        "step",
        "tokens",
        "loss",
        "lr",
        "tokens_per_s",
        "mfu",
        "elapsed_s",
    ]
    assert curve["mfu"].isna().all()  # no peak FLOP/s given on CPU
    assert curve["step"].tolist() == [10, 20, 30, 31]
    assert curve["tokens"].iloc[-1] == tokens
    assert curve["lr"].iloc[-1] == pytest.approx(spec.min_lr)
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(OUTPUTS)
    steps = [int(path.name[4:]) for path in sorted((tmp_path / "checkpoints").iterdir())]
    assert steps == spec.checkpoint_steps
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


def step_result(
    batch: Batch,
    micro_batch_size: int,
    checkpointed: bool = False,
    compile_backend: Callable | None = None,
):
    """Loss and updated parameters of one train_step of a fresh tiny model on ``batch``."""
    torch.manual_seed(1)
    model = build_model(SHAPE)
    model.set_activation_checkpointing(checkpointed)
    if compile_backend:
        model.compile_blocks(compile_backend)
    objective = TrainingObjective(model, z_loss=1e-4)
    optimizer = make_optimizer(objective, make_spec(1), torch.device("cpu"))
    settings = StepSettings(micro_batch_size, grad_clip=1.0, device=torch.device("cpu"))
    loss = train_step(objective, optimizer, batch, 0.01, settings)
    return loss, [parameter.detach().clone() for parameter in model.parameters()]


def random_batch() -> Batch:
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH_SIZE, SHAPE["context_length"] + 1))
    targets = ids[:, 1:].clone()
    targets[-1, 5:] = IGNORE_INDEX  # a short last sequence
    return Batch(ids[:, :-1], targets, int((targets != IGNORE_INDEX).sum()))


def test_micro_batches_give_the_same_step_as_the_whole_batch():
    batch = random_batch()
    whole_loss, whole = step_result(batch, BATCH_SIZE)
    micro_loss, micro = step_result(batch, 3)
    torch.testing.assert_close(whole_loss, micro_loss)
    for whole_parameter, micro_parameter in zip(whole, micro, strict=True):
        torch.testing.assert_close(whole_parameter, micro_parameter)


def test_activation_checkpointing_computes_the_same_step():
    """Recomputing the blocks' activations in the backward pass repeats the same arithmetic
    on the same inputs, so on CPU the loss and every updated weight are bitwise equal."""
    batch = random_batch()
    plain_loss, plain = step_result(batch, 3)
    checkpointed_loss, checkpointed = step_result(batch, 3, checkpointed=True)
    assert torch.equal(plain_loss, checkpointed_loss)
    for plain_parameter, checkpointed_parameter in zip(plain, checkpointed, strict=True):
        assert torch.equal(plain_parameter, checkpointed_parameter)
    # The first step moves every weight away from the initial one: the check is not vacuous.
    torch.manual_seed(1)
    initial = list(build_model(SHAPE).parameters())
    assert all(not torch.equal(a, b) for a, b in zip(initial, plain, strict=True))


def test_compiled_blocks_compute_the_same_step():
    """``compile_blocks`` captures each block's graph (inside the activation checkpoint)
    and renames no parameter. The test's backend records the captured graphs and runs them
    as they are, which is quick where inductor's code generation is slow on a CPU.
    """
    captured = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        captured.append(graph)
        return graph.forward

    batch = random_batch()
    plain_loss, plain = step_result(batch, 3, checkpointed=True)
    compiled_loss, compiled = step_result(
        batch, 3, checkpointed=True, compile_backend=recording_backend
    )
    assert captured
    assert torch.equal(plain_loss, compiled_loss)
    for plain_parameter, compiled_parameter in zip(plain, compiled, strict=True):
        assert torch.equal(plain_parameter, compiled_parameter)
    torch.manual_seed(0)
    model = build_model(SHAPE)
    names = list(model.state_dict())
    model.compile_blocks(recording_backend)
    assert list(model.state_dict()) == names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_step_never_waits_for_the_gpu():
    """Host-to-device copies, the forward and backward passes, clipping and fused AdamW all
    queue work without a synchronising call, so the host runs ahead of the GPU."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(SHAPE).to(device)
    objective = TrainingObjective(model, z_loss=1e-4)
    optimizer = make_optimizer(objective, make_spec(1), device)
    settings = StepSettings(3, grad_clip=1.0, device=device)
    batch = random_batch()
    inputs, targets = batch.inputs.numpy(), batch.targets.numpy()
    train_step(objective, optimizer, batch_on(device, inputs, targets, batch), 0.01, settings)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_device = batch_on(device, inputs, targets, batch)
        loss = train_step(objective, optimizer, on_device, 0.01, settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def batch_on(device: torch.device, inputs: np.ndarray, targets: np.ndarray, batch: Batch):
    return Batch(to_device(inputs, device), to_device(targets, device), batch.n_targets)


def test_flops_per_token_is_6n_plus_attention():
    """The paper's 0.411B at context 2048: 6N + 12 L d T."""
    shape = {"n_layers": 24, "d_model": 1024, "context_length": 2048}
    assert flops_per_token(shape, 411_000_000) == 6 * 411_000_000 + 12 * 24 * 1024 * 2048


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


def saved_step(resume_path: Path) -> int:
    """The step of the resume state at ``resume_path`` (0 if there is none yet)."""
    try:
        return torch.load(resume_path, weights_only=False)["progress"]["step"]
    except FileNotFoundError:
        return 0


def checkpoint_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        path.name: load_file(path / "model.safetensors")
        for path in sorted((run_dir / "checkpoints").iterdir())
    }


def test_interrupted_runs_resume_to_the_uninterrupted_result(data, tmp_path, capfd):
    """SIGTERM, then SIGKILL, then a run to the end reproduce the uninterrupted run exactly.

    A step's data and learning rate are functions of its number, the resume state holds the
    weights, AdamW's moments and step counts, the RNG states and the loss sum since the last
    curve row, and on CPU with one thread every kernel is deterministic: so the comparison
    is bitwise (weights of every checkpoint, and the curve's loss and lr), not approximate.
    The last leg resumes under other engine settings (activation checkpointing, no periodic
    saves): they are not part of the resume state's identity, and change no result.
    """
    spec = make_spec(700 * TOKENS_PER_STEP - 7)
    engine = make_engine(resume_every=30, log_every=20)
    run_dir = tmp_path / "interrupted"
    resume_path = run_dir / "work" / "resume.pt"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}

    # SIGTERM (a scheduler's preemption): the run finishes its step, saves and exits.
    terminated = subprocess.Popen(
        train_command(spec, data, run_dir, engine),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    for line in terminated.stderr:
        if line.startswith("step "):
            break
    terminated.send_signal(signal.SIGTERM)
    _, rest = terminated.communicate(timeout=60)
    assert terminated.returncode == 128 + signal.SIGTERM, rest
    stopped_at = int(rest.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert 20 <= stopped_at < 700
    assert saved_step(resume_path) == stopped_at  # saved on the signal, not at a multiple of 30
    assert not any((run_dir / name).exists() for name in OUTPUTS)

    # SIGKILL (node loss) once the resumed run has saved a later state: it loses those steps.
    killed_log = tmp_path / "killed.log"
    with killed_log.open("w") as stderr:
        killed = subprocess.Popen(
            train_command(spec, data, run_dir, engine),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment,
        )
        wait_for(lambda: saved_step(resume_path) > stopped_at, killed)
        killed.kill()
        killed.wait()
    assert f"resuming at step {stopped_at}/700" in killed_log.read_text()
    killed_at = saved_step(resume_path)
    assert stopped_at < killed_at < 700
    assert not any((run_dir / name).exists() for name in OUTPUTS)

    capfd.readouterr()
    resumed_engine = make_engine(activation_checkpointing=True, log_every=20)
    resumed = run_train(spec, data, run_dir, resumed_engine)
    assert f"resuming at step {killed_at}/700" in capfd.readouterr().err
    uninterrupted = run_train(spec, data, tmp_path / "uninterrupted", make_engine(log_every=20))
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    columns = ["step", "tokens", "loss", "lr"]
    resumed_curve = pd.read_parquet(run_dir / "curve.parquet")[columns]
    full_curve = pd.read_parquet(tmp_path / "uninterrupted" / "curve.parquet")[columns]
    pd.testing.assert_frame_equal(resumed_curve, full_curve, check_exact=True)
    resumed_weights = checkpoint_weights(run_dir)
    full_weights = checkpoint_weights(tmp_path / "uninterrupted")
    assert list(resumed_weights) == ["step000350", "step000700"]
    for step, weights in full_weights.items():
        assert resumed_weights[step].keys() == weights.keys()
        for name, tensor in weights.items():
            assert torch.equal(resumed_weights[step][name], tensor), (step, name)
    assert not (run_dir / "work").exists()


def test_a_resume_state_of_another_spec_is_discarded(data, tmp_path, capfd):
    spec = make_spec(20 * TOKENS_PER_STEP)
    (tmp_path / "work").mkdir()
    torch.save({"format": RESUME_FORMAT, "spec_hash": "x"}, tmp_path / "work" / "resume.pt")
    run_train(spec, data, tmp_path)
    assert "discarding the resume state of a different spec" in capfd.readouterr().err
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 20


def test_log_every_is_an_engine_setting_and_changes_no_run(tiny_config):
    """How often a run logs changes none of its weights: it is not in the hashed RunSpec, so
    changing it re-runs nothing and a killed run resumes under the new value."""
    specs, engines = [], []
    for log_every in (5, 50):
        tiny_config["train"]["log_every"] = log_every
        config = validate_config(tiny_config)
        run = trained_runs(config)[0]
        specs.append(run_spec(config, run))
        engines.append(engine_settings(config, run))
    assert specs[0] == specs[1] and spec_hash(specs[0]) == spec_hash(specs[1])
    assert [engine.log_every for engine in engines] == [5, 50]


def curve_of(losses: list[float], tokens_per_row: int = 100) -> list[dict]:
    """Curve rows of equal token counts with the given losses."""
    return [
        {"step": 10 * (row + 1), "tokens": tokens_per_row * (row + 1), "loss": loss}
        for row, loss in enumerate(losses)
    ]


def test_divergence_is_a_late_rise_well_above_the_lowest_smoothed_loss():
    learning = [5.0 / (1 + 0.1 * row) + 0.05 * (-1) ** row for row in range(50)]
    assert divergence(curve_of(learning), 5000) is None
    # A short last step (1 token) at a high loss joins the rows before it: no alarm.
    short_last = [*curve_of(learning), {"step": 501, "tokens": 5001, "loss": 9.0}]
    assert divergence(short_last, 5001) is None
    # The last tenth (5 rows) ends 30% above the last row before it, 31% above the lowest
    # 5-row mean: diverged, and the reason names both means and their steps.
    rising = learning[:45] + [learning[44] * 1.3] * 5
    assert divergence(curve_of(rising), 5000) == (
        "the mean training loss of the last tenth of the tokens (steps 451-500) is 1.2687, "
        "31% above its lowest, 0.9711 (steps 391-440)"
    )
    # 15% above is within the margin.
    assert divergence(curve_of(learning[:45] + [learning[44] * 1.15] * 5), 5000) is None
