"""Token ids on disk as memory-mapped shards, read as one stream and cut into training batches.

A shard directory holds raw little-endian arrays (``00000.bin``, ``00001.bin``, ...) and a
``meta.json`` that lists them. Training reads exact token ranges from the concatenated
stream without loading it into memory, so a corpus can be far larger than RAM. Writing
our own 30-line format is simpler than any library format for "a flat array of ids".

The stream is cut into sequences of the context length, and training takes them in one of two
orders (``train.data_order``). ``spread`` (the default) takes sequence ``i`` from position
``(i * stride) mod n`` of the stream's ``n`` sequences, ``stride`` near ``n`` over the golden
ratio and sharing no factor with ``n``: a permutation in which consecutive sequences, and so a
step's batch, come from far-apart documents, as a shuffled loader's would, computed in O(1)
with no index to store. ``contiguous`` takes them in stream order, so a step's batch is a few
consecutive documents; on a corpus of long documents (the default's) that makes the loss curve
follow the documents and the final loss depend on the last few read, which is why it is not
the default (it reproduces runs of the pipeline before ``data_order`` existed). Either way a
run of D tokens trains on the order's first D, and a longer run on the same ones and more.

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
DATA_ORDERS = ("spread", "contiguous")
GOLDEN_RATIO = (1 + math.sqrt(5)) / 2


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


def spread_stride(n_sequences: int) -> int:
    """The stride of the spread order over ``n_sequences``: the integer nearest
    ``n_sequences`` over the golden ratio that shares no factor with it, so that
    ``i -> i * stride mod n_sequences`` visits every sequence once, far from the last."""
    stride = max(1, round(n_sequences / GOLDEN_RATIO))
    while math.gcd(stride, n_sequences) != 1:
        stride += 1
    return stride


def sequence_count(shards: TokenShards, context_length: int) -> int:
    """Sequences of ``context_length`` targets the stream holds (each also reads the id before
    its first target)."""
    return max(0, (shards.n_tokens - 1) // context_length)


def tokens_needed(tokens: int, context_length: int, order: str) -> int:
    """Stream ids a run of ``tokens`` targets reads in ``order``: contiguous, D + 1; spread,
    whole sequences, so the stream must hold ceil(D / T) of them."""
    if order == "contiguous":
        return tokens + 1
    return math.ceil(tokens / context_length) * context_length + 1


def read_batch(
    shards: TokenShards,
    step_index: int,
    batch_size: int,
    context_length: int,
    tokens: int,
    processes: Processes,
    order: str,
) -> tuple[np.ndarray, np.ndarray, int]:
    """This process's inputs and targets ((sequences, T) int64) of 0-based step ``step_index``,
    and the step's target count over all processes.

    The step predicts the targets of sequences ``step_index*B .. step_index*B + B - 1`` of the
    ``order`` (the module's docstring), the last of a run cut short so that it predicts exactly
    D; in contiguous order these are stream ids ``start+1 .. start+n`` with
    ``start = step_index*B*T``. Process r of W takes sequences ``[r*B/W, (r+1)*B/W)``, so the
    shares are disjoint and together exactly the step. In a short last step the unused
    positions of the last sequence get input 0 and target IGNORE_INDEX (causal attention keeps
    them from affecting the real positions); a process left with no sequence gets one of those
    only, which adds nothing to the gradient but lets it take part in the all-reduce.
    """
    # The model's module imports torch, which only the trainer has by the time it calls this.
    from workflow.model import IGNORE_INDEX

    if order not in DATA_ORDERS:
        raise ValueError(f"data order {order!r} is not one of {DATA_ORDERS}")
    tokens_per_step = batch_size * context_length
    start = step_index * tokens_per_step
    n_targets = min(tokens_per_step, tokens - start)
    share = tokens_per_step // processes.world_size
    offset = processes.rank * share
    n_local = max(0, min(share, n_targets - offset))
    n_sequences = max(1, math.ceil(n_local / context_length))
    inputs = np.zeros(n_sequences * context_length, dtype=np.int64)
    targets = np.full(n_sequences * context_length, IGNORE_INDEX, dtype=np.int64)
    if n_local and order == "contiguous":
        ids = shards.read(start + offset, n_local + 1)
        inputs[:n_local] = ids[:-1]
        targets[:n_local] = ids[1:]
    elif n_local:
        total = sequence_count(shards, context_length)
        stride = spread_stride(total)
        first = (start + offset) // context_length
        for index in range(n_sequences):
            length = min(context_length, n_local - index * context_length)
            if first + index >= total:
                raise IndexError(
                    f"sequence {first + index} is beyond the {total} sequences of "
                    f"{context_length} tokens in {shards.directory}"
                )
            position = (first + index) * stride % total * context_length
            ids = shards.read(position, length + 1)
            here = index * context_length
            inputs[here : here + length] = ids[:-1]
            targets[here : here + length] = ids[1:]
    shape = (n_sequences, context_length)
    return inputs.reshape(shape), targets.reshape(shape), n_targets
