"""Evaluate stage pieces: fixed validation windows and the bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from workflow.evaluate import EvaluateError, bootstrap_interval, validation_sequences
from workflow.shards import TokenShards, write_shards


def test_validation_windows_are_consecutive_and_capped(tmp_path):
    write_shards(
        tmp_path / "val", [np.arange(1000) % 50], vocab_size=64, eot_id=0, shard_tokens=300
    )
    sequences = validation_sequences(
        TokenShards(tmp_path / "val"), context_length=10, max_tokens=95
    )
    assert sequences.shape == (9, 11)
    assert (sequences[1, 0], sequences[1, -1]) == (10 % 50, 20 % 50)


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
