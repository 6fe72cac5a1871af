"""How each rank writes its checkpoint files: through Python file objects (so a full disk keeps its errno), fsynced
and measured for files.json by the rank that wrote them (in parallel), and failing *quietly*.

Quietly, because DeepSpeed's `save_checkpoint` runs collectives after its writes (ZeRO-3 re-gathers its
persistent parameters): a rank that raised out of it would leave the others waiting in that collective. So a
failed write is recorded, the rank writes nothing more, DeepSpeed's save finishes on every rank, and then all
ranks look at every rank's failure together (`Checkpointer.save`).

In the background (`checkpoint.async_save`), `save` only snapshots the state (a copy of every tensor: training
changes them in place at the next step) and one thread per rank serialises, fsyncs and measures the files
while training goes on; `wait` blocks until it is done. Publishing still waits for every rank's writes.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.verify import describe

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""No space left, quota exceeded, file over the size limit (RLIMIT_FSIZE, or the file system's)."""


class _ErrnoKeepingFile:
    """A write-only file whose OSError survives torch.save (which re-raises it as a RuntimeError without errno)."""

    def __init__(self, raw: Any):
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.raw.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.raw.flush()


class FailedWrite(RuntimeError):
    """What stopped a rank's checkpoint writes: `disk_full` for ENOSPC / EDQUOT / EFBIG."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full


def snapshot(obj: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """A copy of a (nested dict / list / tuple) state whose tensors are copied to host memory, once each (a tensor
    that appears twice, like a tied embedding, stays one tensor); other values are kept as they are. Host memory,
    not the accelerator's: the copy must not take the memory training needs."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        copy = type(obj)() if type(obj) is not dict else {}
        copy.update((k, snapshot(v, memo)) for k, v in obj.items())
        return copy
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v, memo) for v in obj)
    return obj


class RankWriter:
    """This rank's file writes for one checkpoint; `error` is the first failure (nothing is written after it).
    With `background`, `save` returns after a snapshot and the writes run in one thread, in order."""

    def __init__(self, rank: int, background: bool = False) -> None:
        self.rank = rank
        self.written: dict[str, dict[str, Any]] = {}
        self.error: FailedWrite | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if background else None
        self._writes: list[Future] = []

    def save(self, obj: Any, path: str | Path) -> None:
        if self._pool is None:
            self._write(obj, path)
        else:
            self._writes.append(self._pool.submit(self._write, snapshot(obj), path))

    def done(self) -> bool:
        return all(w.done() for w in self._writes)

    def wait(self) -> None:
        for w in self._writes:
            w.result()  # _write records its failures itself: this only waits
        if self._pool is not None:
            self._pool.shutdown()

    def _write(self, obj: Any, path: str | Path) -> None:
        if self.error is not None:
            return
        sink = None
        try:
            with open(path, "wb") as raw:
                sink = _ErrnoKeepingFile(raw)
                torch.save(obj, sink)
                raw.flush()
                os.fsync(raw.fileno())  # here, in parallel on every rank, rather than serially on rank 0
            self.written[str(path)] = describe(Path(path))  # read back from the page cache: cheap
        except Exception as e:  # noqa: BLE001 - every failure is reported to all ranks by Checkpointer.save
            cause = sink.error if sink is not None and sink.error is not None else e
            full = isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS
            self.error = FailedWrite(f"rank {self.rank} writing {path}: {cause}", disk_full=full)

    def entries_under(self, folder: Path) -> dict[str, dict[str, Any]]:
        """files.json entries of the files written under `folder`, by path relative to it."""
        return {os.path.relpath(p, folder): e for p, e in self.written.items()
                if Path(p).resolve().is_relative_to(folder.resolve())}


class WriterEngine:
    """DeepSpeed's checkpoint engine with its `save` replaced by a RankWriter's; everything else (load, commit,
    makedirs) goes to the engine DeepSpeed configured."""

    def __init__(self, inner: Any, writer: RankWriter):
        self.inner = inner
        self.writer = writer

    def save(self, state_dict: Any, path: str) -> None:
        self.writer.save(state_dict, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
