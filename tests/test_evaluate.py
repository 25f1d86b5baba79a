"""Evaluate stage: fixed validation windows, the bootstrap interval, and where it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import make_shape

from workflow.evaluate import (
    EvaluateError,
    bootstrap_interval,
    evaluate_checkpoint,
    validation_sequences,
)
from workflow.model import build_model
from workflow.shards import TokenShards, write_shards


def test_validation_windows_are_spread_over_the_whole_split_and_capped(tmp_path):
    write_shards(tmp_path / "val", [np.arange(1000)], vocab_size=1024, eot_id=0, shard_tokens=300)
    shards = TokenShards(tmp_path / "val")
    # 99 non-overlapping windows of 10 targets; 9 fit in max_tokens, every eleventh is taken.
    sequences = validation_sequences(shards, context_length=10, max_tokens=95)
    assert sequences.shape == (9, 11)
    assert sequences[:, 0].tolist() == [0, 110, 220, 330, 440, 550, 660, 770, 880]
    assert (sequences[:, 1:] == sequences[:, :-1] + 1).all()  # each window is contiguous
    everything = validation_sequences(shards, context_length=10, max_tokens=10**6)
    assert everything.shape == (99, 11)
    assert everything[-1, -1] == 990


def test_too_small_validation_split_names_the_fix(tmp_path):
    write_shards(tmp_path / "val", [np.arange(5)], vocab_size=64, eot_id=0)
    with pytest.raises(EvaluateError, match="val_fraction"):
        validation_sequences(TokenShards(tmp_path / "val"), context_length=10, max_tokens=100)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(4.0, 0.5, 50), rng.normal(4.0, 0.5, 5000)
    low_small, high_small = bootstrap_interval(small, 500)
    low_large, high_large = bootstrap_interval(large, 500)
    assert low_small < small.mean() < high_small
    assert low_large < large.mean() < high_large
    assert high_large - low_large < (high_small - low_small) / 5


def test_each_set_is_scored_into_the_file_the_rule_names(tmp_path):
    torch.manual_seed(0)
    build_model(make_shape(vocab_size=64, context_length=8)).save_pretrained(tmp_path / "model")
    validation, outputs = {}, {}
    for name in ("first", "second"):
        ids = np.random.default_rng(len(name)).integers(0, 64, 200)
        write_shards(tmp_path / name, [ids], vocab_size=64, eot_id=0)
        validation[name] = str(tmp_path / name)
        outputs[name] = str(tmp_path / "out" / f"{name}-anywhere.json")
    run = {"dataset": "toy", "step": 3}
    records = evaluate_checkpoint(
        tmp_path / "model", validation, outputs, run, 80, 50, batch_size=4, device="cpu"
    )
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "first-anywhere.json",
        "second-anywhere.json",
    ]
    for record in records:
        written = json.loads(Path(outputs[record["eval"]]).read_text())
        assert written == record
        assert written["dataset"] == "toy" and written["n_examples"] == 10
    with pytest.raises(EvaluateError, match="give each set both"):
        evaluate_checkpoint(
            tmp_path / "model", validation, {"first": outputs["first"]}, run, 80, 50, 4, "cpu"
        )
