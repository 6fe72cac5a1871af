"""Graceful stop on SIGTERM / SIGUSR1: finish the step, save a checkpoint, exit with EXIT_PREEMPTED.

SLURM sends USR1 (`--signal=B:USR1@grace`, forwarded by the batch script) before preemption and TERM on
`scancel`; the batch script requeues the job when the trainer exits with EXIT_PREEMPTED. The handler only sets
a flag: the save happens at the next step boundary on every rank together, so a second signal during the
save changes nothing and cannot corrupt it.
"""

from __future__ import annotations

import signal
from types import FrameType

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" - i.e. requeue and resume.
EXIT_PREEMPTED = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def fail_writes_over_the_file_size_limit() -> None:
    """Ignore SIGXFSZ: a write over the file-size limit (RLIMIT_FSIZE, `ulimit -f`) then fails with EFBIG, which a
    checkpoint save handles like a full disk, instead of the signal killing the process mid-save."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class StopRequest:
    """Remembers the first stop signal this process received."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def ignore_further(self) -> None:
        """From the moment the stop is acted on: further requests are ignored outright. The launchers and batch
        scripts repeat theirs (a process still starting up would miss a single one), and at interpreter
        shutdown Python puts back the default action of the handlers it installed - death by the signal,
        which would replace exit code 75."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
