"""One logger interface, several backends: `metrics.jsonl` in the run folder always, W&B when enabled.

Only rank 0 constructs a logger with backends; other ranks get one with no backends (see `build_logger`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dist_train.monitor.jsonl import JsonlBackend
from dist_train.monitor.wandb_run import start_wandb

if TYPE_CHECKING:
    from dist_train.checkpoint.layout import TrainState
    from dist_train.config import Config
    from dist_train.distributed.environment import ProcessPlace




class MetricsBackend(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def event(self, record: dict[str, Any]) -> None: ...
    def rewind(self, step: int) -> None: ...
    def summary(self, summary: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class MetricsLogger:
    def __init__(self, backends: list[MetricsBackend]):
        self.backends = backends

    def log(self, record: dict[str, Any]) -> None:
        for b in self.backends:
            b.log(record)

    def event(self, record: dict[str, Any]) -> None:
        """Something that happened to the run (a corrupt checkpoint set aside, a loss-spike rollback): a record with
        `step` and `event` (its name) plus details."""
        for b in self.backends:
            b.event(record)

    def rewind(self, step: int) -> None:
        """The run went back to `step` (a rollback): the steps after it will be trained again."""
        for b in self.backends:
            b.rewind(step)

    def summary(self, summary: dict[str, Any]) -> None:
        for b in self.backends:
            b.summary(summary)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def build_logger(cfg: Config, run_dir: Path, place: ProcessPlace, state: TrainState,
                 resumed: bool) -> MetricsLogger:
    """Rank 0 logs to metrics.jsonl and, when enabled, W&B; other ranks get a logger without backends."""
    if not place.is_rank0:
        return MetricsLogger([])
    backends: list[MetricsBackend] = [JsonlBackend(run_dir, resume_step=state.step if resumed else None)]
    # After JsonlBackend: W&B's catch-up on resume reads the already truncated metrics.jsonl.
    wandb_backend = start_wandb(cfg, run_dir, state, resumed)
    if wandb_backend is not None:
        backends.append(wandb_backend)
    return MetricsLogger(backends)
