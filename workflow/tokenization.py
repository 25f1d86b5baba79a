"""Tokenizer and encode stages: a byte-level BPE (or a named tokenizer), then token shards.

Byte-level BPE has no unknown tokens and decodes every text back exactly, so validation loss
is comparable across corpora, code included. One special token, ``<|endoftext|>`` (id 0),
is the bos/eos/unk/pad token: it separates documents in the token stream, and lm-eval uses
the eos token as the prefix of rolling-loglikelihood windows, so both see the same separator.

    python -m workflow.tokenization train --corpus TRAIN_JSONL --vocab-size V --out DIR
    python -m workflow.tokenization pretrained --name NAME --vocab-size V --out DIR
    python -m workflow.tokenization encode --tokenizer DIR --corpus JSONL --out SHARD_DIR \
        --shard-tokens N

Every subcommand takes ``--threads T`` (the Rust thread pool; default: RAYON_NUM_THREADS if
set, else every core).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workflow.atomic import atomic_path
from workflow.shards import token_dtype, write_shards

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
BATCH_DOCUMENTS = 2048


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or used as configured; the message names the fix."""


def text_batches(corpus: str | Path) -> Iterator[list[str]]:
    """The documents of a ``{"text": ...}`` JSONL file, ``BATCH_DOCUMENTS`` at a time.

    Batches keep memory flat for any corpus size and let the Rust side use its threads.
    """
    with Path(corpus).open(encoding="utf-8") as lines:
        texts = (json.loads(line)["text"] for line in lines)
        while batch := list(itertools.islice(texts, BATCH_DOCUMENTS)):
            yield batch


def train_tokenizer(corpus: str | Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly ``vocab_size`` tokens, trained on a JSONL corpus.

    The 256 byte symbols are the initial alphabet, so any text encodes without unknowns;
    ``min_frequency=2`` keeps merges that occur once (noise) out of the vocabulary.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text_batches(corpus), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise TokenizerError(
            f"{corpus} is too small for a vocabulary of {vocab_size}: BPE found only "
            f"{tokenizer.get_vocab_size()} tokens (merges seen at least twice). Lower "
            "tokenizer.vocab_size or train it on a larger dataset."
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,  # else decode() rewrites " ." to "."
    )


def load_pretrained(name: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A named tokenizer, checked to fit the model's ``vocab_size`` and to have an eos token.

    A hub name (``EleutherAI/gpt-neox-20b``) needs network access to huggingface.co; a local
    save_pretrained directory does not.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise TokenizerError(
            f"cannot load tokenizer {name!r}: {error}. A hub name needs network access to "
            "huggingface.co; a local path must be a save_pretrained directory."
        ) from error
    if not tokenizer.is_fast:
        raise TokenizerError(f"tokenizer {name!r} has no fast (Rust) backend, which encode needs")
    if len(tokenizer) > vocab_size:
        raise TokenizerError(
            f"tokenizer {name!r} has {len(tokenizer)} tokens, more than tokenizer.vocab_size "
            f"{vocab_size}; raise vocab_size to at least {len(tokenizer)}"
        )
    if tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {name!r} has no eos token, which separates documents; choose another"
        )
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """``save_pretrained`` into ``out_dir``, which appears only when complete."""
    with atomic_path(out_dir) as temporary:
        tokenizer.save_pretrained(temporary)


def _token_batches(
    tokenizer: PreTrainedTokenizerFast, corpus: str | Path, stats: dict
) -> Iterator[np.ndarray]:
    """Ids of a batch of documents at a time, each document followed by eos.

    Special tokens are not matched inside documents, so eos marks exactly the boundaries.

    ``stats`` is filled as the batches are consumed and completed after the last one.
    """
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not a boundary
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    start = time.monotonic()
    for batch in text_batches(corpus):
        encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
        n_ids = sum(len(encoding.ids) for encoding in encodings) + len(batch)
        ids = itertools.chain.from_iterable((*encoding.ids, eos) for encoding in encodings)
        stats["n_documents"] += len(batch)
        stats["text_bytes"] += sum(len(text.encode("utf-8")) for text in batch)
        stats["text_tokens"] += n_ids - len(batch)
        yield np.fromiter(ids, dtype=dtype, count=n_ids)
    seconds = time.monotonic() - start
    stats["seconds"] = round(seconds, 3)
    stats["tokens_per_second"] = round(
        (stats["text_tokens"] + stats["n_documents"]) / max(seconds, 1e-9)
    )
    stats["bytes_per_token"] = round(stats["text_bytes"] / max(stats["text_tokens"], 1), 4)


def encode_corpus(
    tokenizer_dir: str | Path,
    corpus: str | Path,
    out_dir: str | Path,
    shard_tokens: int = 2**28,
) -> dict:
    """Encode a JSONL corpus as a ``workflow.shards`` directory; returns its metadata.

    Besides the shard fields, the metadata holds ``n_documents``, ``text_bytes``,
    ``text_tokens`` (ids without the eos separators), ``seconds``, ``tokens_per_second``
    (every id) and ``bytes_per_token`` (text bytes per text token: the tokenizer's
    compression on this corpus).
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"tokenizer {tokenizer_dir} has no eos token to separate documents")
    stats = {"tokenizer": str(tokenizer_dir), "corpus": str(corpus)}
    stats.update(n_documents=0, text_bytes=0, text_tokens=0)
    # write_shards merges extra_meta after consuming every batch, so ``stats`` is complete.
    meta = write_shards(
        out_dir,
        _token_batches(tokenizer, corpus, stats),
        vocab_size=len(tokenizer),
        eot_id=tokenizer.eos_token_id,
        shard_tokens=shard_tokens,
        extra_meta=stats,
    )
    log.info(
        "%s: %d documents, %d tokens in %.1f s: %d tokens/s, %.3f bytes/token",
        corpus,
        meta["n_documents"],
        meta["n_tokens"],
        meta["seconds"],
        meta["tokens_per_second"],
        meta["bytes_per_token"],
    )
    return meta


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, help="Rust threads (default: RAYON_NUM_THREADS)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", parents=[common], help="train a byte-level BPE")
    train.add_argument("--corpus", required=True, help="a train.jsonl of the prepare stage")
    pretrained = commands.add_parser("pretrained", parents=[common], help="save a named one")
    pretrained.add_argument("--name", required=True, help="hub name or local directory")
    for command in (train, pretrained):
        command.add_argument("--vocab-size", type=int, required=True)
        command.add_argument("--out", required=True, help="tokenizer directory to write")
    encode = commands.add_parser("encode", parents=[common], help="encode a corpus as shards")
    encode.add_argument("--tokenizer", required=True, help="tokenizer directory")
    encode.add_argument("--corpus", required=True, help="JSONL of the prepare stage")
    encode.add_argument("--out", required=True, help="shard directory to write")
    encode.add_argument(
        "--shard-tokens", type=int, required=True, help="ids per shard (tokenizer.shard_tokens)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    if args.threads is not None:  # read by the Rust pool when it first starts
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    start = time.monotonic()
    try:
        if args.command == "encode":
            encode_corpus(args.tokenizer, args.corpus, args.out, args.shard_tokens)
            return
        if args.command == "train":
            tokenizer = train_tokenizer(args.corpus, args.vocab_size)
        else:
            tokenizer = load_pretrained(args.name, args.vocab_size)
        save_tokenizer(tokenizer, args.out)
    except TokenizerError as error:
        sys.exit(f"error: {error}")
    log.info("%s: %d tokens, %.1f s", args.out, len(tokenizer), time.monotonic() - start)


if __name__ == "__main__":
    main()
