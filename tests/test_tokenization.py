"""The tokenizer and encode stages for real: exact vocabulary, determinism, round trip, shards."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workflow.shards import TokenShards
from workflow.tokenization import (
    BATCH_DOCUMENTS,
    END_OF_TEXT,
    TokenizerError,
    encode_corpus,
    load_pretrained,
    save_tokenizer,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
ROUND_TRIP = [
    "Plain English prose. It has sentences , odd  spacing ,and 'quotes' .",
    "naïve café — Ünïcödé, 日本語のテキスト, emoji 😀👍🏽, and Ω≈ç√∫.",
    'def f(x: int) -> str:\n\tif x > 0:\n        return "yes"  # comment\n    return ""\n',
    "  leading and trailing whitespace \n\n\r\n  ",
    "<|endoftext|> is plain text inside a document",
]


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def run_stage(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "workflow.tokenization", *arguments]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real text: about 1 MB of the standard library's source, plus the round-trip texts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [path.read_text(errors="replace") for path in sorted(stdlib.glob("*.py"))[:60]]
    return write_corpus(tmp_path_factory.mktemp("corpus") / "train.jsonl", sources + ROUND_TRIP)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    """The tokenizer the command line trains (one thread)."""
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    run_stage(
        *("train", "--corpus", str(corpus), "--vocab-size", str(VOCAB)),
        *("--out", str(out), "--threads", "1"),
    )
    return out


def test_trained_tokenizer_has_exactly_the_vocabulary_and_one_special_token(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == VOCAB
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 0
    special = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token}
    assert special == {END_OF_TEXT}
    assert tokenizer.eos_token_id == 0


def test_training_is_deterministic_across_runs_and_thread_counts(corpus, tokenizer_dir, tmp_path):
    for attempt in range(2):
        save_tokenizer(train_tokenizer(corpus, VOCAB), tmp_path / str(attempt))
        written = (tmp_path / str(attempt) / "tokenizer.json").read_bytes()
        assert written == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_a_corpus_too_small_for_the_vocabulary_fails_clearly(tmp_path):
    small = write_corpus(tmp_path / "small.jsonl", ["a tiny corpus", "a tiny corpus again"])
    with pytest.raises(TokenizerError, match=r"too small for a vocabulary of 4096"):
        train_tokenizer(small, 4096)


def test_decode_inverts_encode(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ROUND_TRIP:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_pretrained_loads_a_local_directory_and_checks_it(tokenizer_dir, tmp_path):
    out = tmp_path / "copy"
    run_stage("pretrained", "--name", str(tokenizer_dir), "--vocab-size", "1024", "--out", str(out))
    copied = AutoTokenizer.from_pretrained(out)
    assert copied.get_vocab() == AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    with pytest.raises(TokenizerError, match=r"512 tokens, more than tokenizer.vocab_size 300"):
        load_pretrained(str(tokenizer_dir), 300)
    no_eos = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=no_eos).save_pretrained(tmp_path / "no_eos")
    with pytest.raises(TokenizerError, match="no eos token"):
        load_pretrained(str(tmp_path / "no_eos"), 1024)
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_pretrained(str(tmp_path / "missing"), 1024)


def decoded_documents(tokenizer_dir: Path, stream: np.ndarray) -> list[str]:
    """The stream cut after every end-of-text id, each piece decoded."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ends = np.flatnonzero(stream == 0)
    assert ends.size and ends[-1] == stream.size - 1  # the stream ends with end-of-text
    pieces = np.split(stream, ends + 1)[:-1]
    return [tokenizer.decode(piece[:-1].tolist()) for piece in pieces]


def test_encode_ends_every_document_with_eot_and_counts_exactly(tokenizer_dir, tmp_path):
    texts = [f"Document {index}: {ROUND_TRIP[index % len(ROUND_TRIP)]}" for index in range(2100)]
    assert len(texts) > BATCH_DOCUMENTS  # more than one batch
    corpus = write_corpus(tmp_path / "val.jsonl", texts)
    meta = encode_corpus(tokenizer_dir, corpus, tmp_path / "shards")
    shards = TokenShards(tmp_path / "shards")
    assert shards.dtype == np.uint16 and shards.eot_id == 0 and shards.vocab_size == VOCAB
    stream = shards.read(0, shards.n_tokens)
    assert decoded_documents(tokenizer_dir, stream) == texts  # "<|endoftext|>" text included
    assert meta["n_tokens"] == stream.size
    assert meta["n_documents"] == len(texts)
    assert meta["text_tokens"] == stream.size - len(texts)
    assert meta["text_bytes"] == sum(len(text.encode()) for text in texts)
    assert meta["bytes_per_token"] == pytest.approx(meta["text_bytes"] / meta["text_tokens"], 1e-3)
    assert meta["tokens_per_second"] > 0 and meta["seconds"] > 0
    assert json.loads((tmp_path / "shards" / "meta.json").read_text()) == meta


def test_encode_command_splits_the_stream_across_small_shards(tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "val.jsonl", ROUND_TRIP * 3)
    out = tmp_path / "shards"
    result = run_stage(
        *("encode", "--tokenizer", str(tokenizer_dir), "--corpus", str(corpus)),
        *("--out", str(out), "--shard-tokens", "50", "--threads", "1"),
    )
    assert "tokens/s" in result.stderr
    encode_corpus(tokenizer_dir, corpus, tmp_path / "one_shard")
    expected = TokenShards(tmp_path / "one_shard").read(
        0, TokenShards(tmp_path / "one_shard").n_tokens
    )
    shards = TokenShards(out)
    sizes = [shard["n_tokens"] for shard in shards.meta["shards"]]
    assert sum(sizes) == expected.size and len(sizes) == -(-expected.size // 50)
    assert all(size == 50 for size in sizes[:-1])
    np.testing.assert_array_equal(shards.read(0, shards.n_tokens), expected)
    np.testing.assert_array_equal(shards.read(45, 60), expected[45:105])
    assert decoded_documents(tokenizer_dir, expected) == ROUND_TRIP * 3
