"""Fixed-size token shard files for one split, written so that a killed run can resume exactly.

A split's token stream is appended to `SPLIT.partial`; each time it reaches `shard_tokens` tokens the
file is flushed, synced and renamed to `SPLIT_NNNNN.bin` (so a `.bin` file is always complete). The
writer's `state()` — finished shards and the token count of the open `.partial` — goes into the
run's checkpoint (`progress.json`, see `data_prep.shard`) together with the number of documents
consumed. Resuming truncates `.partial` back to the checkpointed length, so tokens written after the
last checkpoint are written again, once.

Each shard's manifest entry records its largest token id (`max_token_id`), so that training can refuse ids
outside the model's vocabulary (a shard from another tokenizer, a wrong dtype) without reading the data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from dist_train.formats.manifest import DTYPES


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def partial_name(split: str) -> str:
    return f"{split}.partial"


class ResumeMismatch(Exception):
    """The files on disk do not match the checkpoint; the caller starts the split over."""


class SplitWriter:
    """Appends one split's tokens to shard files of exactly `shard_tokens` tokens (the last may be shorter)."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int,
                 state: dict | None = None) -> None:
        self.folder = folder
        self.split = split
        self.dtype = DTYPES[dtype]
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = list(state["shards"]) if state else []
        self.open_tokens = state["open_tokens"] if state else 0
        self.num_documents = state["num_documents"] if state else 0
        self._hash = hashlib.sha256()
        self._max_id = -1  # the open shard's largest token id (-1: none yet)
        self._file = None
        self._recover()

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self.open_tokens

    def _path(self, name: str) -> Path:
        return self.folder / name

    def _recover(self) -> None:
        """Bring the files back to the checkpointed state (a no-op on a fresh start)."""
        for shard in self.shards:
            path = self._path(shard["path"])
            if not path.is_file() or path.stat().st_size != shard["num_tokens"] * self.dtype.itemsize:
                raise ResumeMismatch(f"{path} does not match the checkpoint")
        partial = self._path(partial_name(self.split))
        renamed = self._path(shard_name(self.split, len(self.shards)))
        # Killed after renaming a full shard but before the checkpoint that lists it: that shard is
        # the checkpoint's open one (anything in a newer `.partial` came later).
        if renamed.exists():
            os.replace(renamed, partial)
        index = len(self.shards) + 1
        while self._path(shard_name(self.split, index)).exists():  # finished after the checkpoint
            self._path(shard_name(self.split, index)).unlink()
            index += 1
        open_bytes = self.open_tokens * self.dtype.itemsize
        if open_bytes and (not partial.exists() or partial.stat().st_size < open_bytes):
            raise ResumeMismatch(f"{partial} is shorter than the checkpoint says")
        if partial.exists():
            with open(partial, "r+b") as f:
                f.truncate(open_bytes)
                while chunk := f.read(1 << 22):  # a multiple of the item size: no token is cut
                    self._hash.update(chunk)
                    self._max_id = max(self._max_id, int(np.frombuffer(chunk, self.dtype).max()))

    def _open(self):
        if self._file is None:
            # Kept open across write() calls; closed by _finish_shard.
            self._file = open(self._path(partial_name(self.split)), "ab")  # noqa: SIM115
        return self._file

    def write(self, tokens: np.ndarray) -> int:
        """Append tokens (any integer array); returns how many shards this completed."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        completed = 0
        while data.size:
            take = min(self.shard_tokens - self.open_tokens, data.size)
            chunk = data[:take].tobytes()
            self._open().write(chunk)
            self._max_id = max(self._max_id, int(data[:take].max()))
            self._hash.update(chunk)
            self.open_tokens += take
            data = data[take:]
            if self.open_tokens == self.shard_tokens:
                self._finish_shard()
                completed += 1
        return completed

    def _finish_shard(self) -> None:
        f = self._open()
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        name = shard_name(self.split, len(self.shards))
        os.replace(self._path(partial_name(self.split)), self._path(name))
        self.shards.append({"path": name, "num_tokens": self.open_tokens, "sha256": self._hash.hexdigest(),
                            "max_token_id": self._max_id})
        self._hash = hashlib.sha256()
        self._max_id = -1
        self.open_tokens = 0

    def sync(self) -> None:
        """Make the open shard's bytes durable before a checkpoint records its length."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def state(self) -> dict:
        return {"shards": list(self.shards), "open_tokens": self.open_tokens,
                "num_documents": self.num_documents}

    def close(self) -> dict:
        """Finish the last (short) shard; the split's manifest entry."""
        if self.open_tokens:
            self._finish_shard()
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "shards": self.shards}
