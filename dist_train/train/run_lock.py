"""One training run per run folder: rank 0 holds an exclusive lock on `RUN/run.lock` for the whole run.

Two trainings in one `run.out_dir` would resume from each other's checkpoints, prune them and rewrite one
`metrics.jsonl`. The lock is the kernel's (`flock`), taken before anything in the folder is written: it dies with
the process that holds it, so a run killed by `kill -9`, the OOM killer or SLURM never blocks the next start, and
nothing else (the file left behind, the PID in it) is ever taken as a sign that a run is alive. The file says who
took it (host, PID, start time, SLURM job), for the message that refuses a second run.

On NFS `flock` is a POSIX lock held for the client by the server: one of a node that crashed lives until the
server's lease expires (about 90 s on NFSv4), so a SLURM requeue of the same job (same job id, a higher restart
count) waits up to `REQUEUE_WAIT_S` for it instead of being refused. A filesystem that cannot lock (Lustre
mounted without `flock`, NFS without a lock daemon) is refused, naming `run.lock=false`, which skips the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_train.distributed.environment import ProcessPlace
from dist_train.distributed.rank0 import Rank0

LOCK_FILE = "run.lock"
REQUEUE_WAIT_S = 150.0
"""How long a requeued SLURM job waits for its earlier start's lock: longer than NFSv4's default lease (90 s)."""
_NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
"""What `flock` answers on a filesystem without locks (Lustre's noflock, NFS with no lock daemon)."""


class RunFolderLocked(RuntimeError):
    """The run folder is held by another run, or cannot be locked; raised on every rank, before any file is
    written (launch/train.py exits 2)."""

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report
        """This rank prints the message (rank 0: one line for the whole job)."""


class RunLock:
    """Rank 0's exclusive lock on RUN/run.lock, held while its file descriptor is open."""

    def __init__(self, run_dir: Path, place: ProcessPlace):
        self.path = run_dir / LOCK_FILE
        self.place = place
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock and write who holds it; return the refusal message when that is not possible."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # no truncation: it names the holder
        except OSError as e:
            return f"cannot create the lock file {self.path}: {e.strerror}"
        try:
            refusal = self._lock(fd)
            if refusal is None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(self._holder()) + "\n").encode(), 0)
                os.fsync(fd)
        except OSError as e:
            refusal = f"cannot lock {self.path}: {e.strerror}"
        if refusal is None:
            self.fd = fd
        else:
            os.close(fd)
        return refusal

    def _lock(self, fd: int) -> str | None:
        """flock, waiting only for an earlier start of this SLURM job; the refusal message if it stays taken."""
        deadline = time.monotonic() + REQUEUE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                holder = read_holder(self.path)
                if not self._earlier_start_of_this_job(holder) or time.monotonic() > deadline:
                    return in_use_message(self.path, holder)
                time.sleep(1.0)
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                return (f"cannot lock {self.path}: the filesystem does not support flock ({e.strerror}), so "
                        f"nothing would stop a second run from using this run folder at the same time. Mount it "
                        f"with locks (Lustre: -o flock), or set run.lock=false and make sure yourself that one run "
                        f"at a time uses run.out_dir={self.path.parent}")

    def _earlier_start_of_this_job(self, holder: dict[str, Any]) -> bool:
        job = self.place.slurm_job_id
        return (job is not None and holder.get("slurm_job_id") == job
                and holder.get("slurm_restart_count", 0) < self.place.slurm_restart_count)

    def _holder(self) -> dict[str, Any]:
        return {"host": self.place.host, "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "slurm_job_id": self.place.slurm_job_id, "slurm_restart_count": self.place.slurm_restart_count}

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the lock with the last descriptor; the file stays, harmless
            self.fd = None


def read_holder(path: Path) -> dict[str, Any]:
    """Who holds (or last held) the lock, as its file says; {} while the holder is still writing it."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def in_use_message(path: Path, holder: dict[str, Any]) -> str:
    if holder:
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}{job}")
    else:
        who = "a process that is just starting (it has not written its name yet)"
    return (f"run.out_dir {path.parent} is in use by another training run: {who}; it holds {path}. Two runs in "
            f"one folder would resume from, prune and overwrite each other's checkpoints and metrics. Wait for it "
            f"to end (or stop it), or give this run its own run.out_dir")


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, place: ProcessPlace, enabled: bool = True) -> Iterator[None]:
    """Every rank calls it: rank 0 takes the lock (before anything in the run folder is written) and holds it
    until the block ends or the process dies. If it cannot, every rank raises RunFolderLocked at the same
    moment, so that no rank is left waiting for one that left."""
    rank0 = Rank0(place)
    lock = RunLock(run_dir, place)
    if not enabled:
        rank0.print(f"warning: run.lock=false: {run_dir} is not locked; nothing stops a second run from using it")
    refusal = rank0.share(lock.acquire) if enabled else None
    if refusal:
        raise RunFolderLocked(refusal, report=place.is_rank0)
    try:
        yield
    finally:
        lock.release()
