"""Token ids on disk as memory-mapped shards, read as one continuous stream.

A shard directory holds raw little-endian arrays (``00000.bin``, ``00001.bin``, ...) and a
``meta.json`` that lists them. Training reads exact token ranges from the concatenated
stream without loading it into memory, so a corpus can be far larger than RAM. Writing
our own 30-line format is simpler than any library format for "a flat array of ids".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from workflow.atomic import atomic_path

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

    The directory appears only when complete (see ``workflow.atomic``). Returns the metadata.
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
            raise FileNotFoundError(
                f"{meta_path} is missing: {self.directory} is not a token shard directory "
                "(the tokenize rule writes one)"
            )
        self.meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.eot_id = int(self.meta["eot_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self._arrays = [
            np.memmap(self.directory / shard["file"], dtype=self.dtype, mode="r")
            for shard in self.meta["shards"]
        ]
        self._starts = np.cumsum([0] + [array.size for array in self._arrays])
        self.n_tokens = int(self._starts[-1])

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
