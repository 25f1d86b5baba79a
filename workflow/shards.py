"""Token ids on disk as memory-mapped shards, read as one stream and cut into training batches.

A shard directory holds raw little-endian arrays (``00000.bin``, ``00001.bin``, ...) and a
``meta.json`` that lists them. Training reads exact token ranges from the concatenated
stream without loading it into memory, so a corpus can be far larger than RAM. Writing
our own 30-line format is simpler than any library format for "a flat array of ids".

This module imports no torch: the tokenize stage writes shards in an environment without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workflow.atomic import atomic_path
from workflow.integrity import DamagedOutputError, rebuild_hint

if TYPE_CHECKING:
    from workflow.distributed import Processes

META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shards(
    out_dir: str | Path,
    token_batches: Iterable[np.ndarray],
    *,
    vocab_size: int,
    eot_id: int,
    shard_tokens: int = 2**28,
    extra_meta: dict | None = None,
) -> dict:
    """Write the concatenation of ``token_batches`` as shards of at most ``shard_tokens`` ids.

    The directory appears only when complete (see ``workflow.atomic``); what a killed writer
    left beside it is removed first. Returns the metadata.
    """
    dtype = token_dtype(vocab_size)
    with atomic_path(out_dir) as temporary:
        temporary.mkdir(parents=True)
        shards: list[dict] = []
        handle = None
        filled = shard_tokens
        for batch in token_batches:
            batch = np.asarray(batch, dtype=dtype)
            while batch.size:
                if filled == shard_tokens:
                    if handle is not None:
                        handle.close()
                    name = f"{len(shards):05d}.bin"
                    handle = open(temporary / name, "wb")  # noqa: SIM115 (closed above/below)
                    shards.append({"file": name, "n_tokens": 0})
                    filled = 0
                take = batch[: shard_tokens - filled]
                handle.write(take.tobytes())
                shards[-1]["n_tokens"] += int(take.size)
                filled += int(take.size)
                batch = batch[take.size :]
        if handle is not None:
            handle.close()
        meta = {
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eot_id": eot_id,
            "n_tokens": sum(shard["n_tokens"] for shard in shards),
            "shards": shards,
            **(extra_meta or {}),
        }
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenShards:
    """A read-only view of a shard directory as one stream of ``n_tokens`` ids."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            raise DamagedOutputError(
                f"{meta_path} is missing: {self.directory} is not a token shard directory. "
                f"The shards come from the tokenize rule: "
                + rebuild_hint(self.directory, "rebuild them")
            )
        self.meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.eot_id = int(self.meta["eot_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        for shard in self.meta["shards"]:
            self._check_size(shard)
        self._arrays = [
            np.memmap(self.directory / shard["file"], dtype=self.dtype, mode="r")
            for shard in self.meta["shards"]
        ]
        self._starts = np.cumsum([0] + [array.size for array in self._arrays])
        self.n_tokens = int(self._starts[-1])

    def _check_size(self, shard: dict) -> None:
        """Refuse a shard file whose size is not what ``meta.json`` lists: a truncated or
        overwritten shard would otherwise read as a shorter or shifted stream."""
        path = self.directory / shard["file"]
        expected = shard["n_tokens"] * self.dtype.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual == expected:
            return
        found = "it is missing" if actual is None else f"it has {actual:,} bytes"
        raise DamagedOutputError(
            f"token shard {path} is damaged: {META_FILE} lists {shard['n_tokens']:,} tokens "
            f"({expected:,} bytes of {self.dtype.name}) but {found}. The shards come from the "
            f"tokenize rule: {rebuild_hint(self.directory, 'rebuild them')}"
        )

    def read(self, start: int, length: int) -> np.ndarray:
        """Ids ``[start, start + length)`` of the stream, as int64, crossing shards if needed."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(
                f"tokens [{start}, {start + length}) are outside the {self.n_tokens} tokens "
                f"of {self.directory}"
            )
        pieces = []
        position = start
        end = start + length
        while position < end:
            index = int(np.searchsorted(self._starts, position, side="right")) - 1
            offset = position - int(self._starts[index])
            take = min(end - position, self._arrays[index].size - offset)
            pieces.append(self._arrays[index][offset : offset + take])
            position += take
        if not pieces:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(pieces).astype(np.int64)


def read_batch(
    shards: TokenShards,
    step_index: int,
    batch_size: int,
    context_length: int,
    tokens: int,
    processes: Processes,
) -> tuple[np.ndarray, np.ndarray, int]:
    """This process's inputs and targets ((sequences, T) int64) of 0-based step ``step_index``,
    and the step's target count over all processes.

    The step predicts stream ids ``start+1 .. start+n`` with ``start = step_index*B*T``, as
    B sequences of T; process r of W takes sequences ``[r*B/W, (r+1)*B/W)``, so the shares are
    disjoint and together exactly the step. In a short last step the unused positions of the
    last sequence get input 0 and target IGNORE_INDEX (causal attention keeps them from
    affecting the real positions); a process left with no sequence gets one of those only,
    which adds nothing to the gradient but lets it take part in the all-reduce.
    """
    # The model's module imports torch, which only the trainer has by the time it calls this.
    from workflow.model import IGNORE_INDEX

    tokens_per_step = batch_size * context_length
    start = step_index * tokens_per_step
    n_targets = min(tokens_per_step, tokens - start)
    share = tokens_per_step // processes.world_size
    offset = processes.rank * share
    n_local = max(0, min(share, n_targets - offset))
    n_sequences = max(1, math.ceil(n_local / context_length))
    inputs = np.zeros(n_sequences * context_length, dtype=np.int64)
    targets = np.full(n_sequences * context_length, IGNORE_INDEX, dtype=np.int64)
    if n_local:
        ids = shards.read(start + offset, n_local + 1)
        inputs[:n_local] = ids[:-1]
        targets[:n_local] = ids[1:]
    shape = (n_sequences, context_length)
    return inputs.reshape(shape), targets.reshape(shape), n_targets
