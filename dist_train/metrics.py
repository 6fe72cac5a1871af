"""One logger interface, several backends: `metrics.jsonl` in the run folder always, W&B when enabled.

Only rank 0 constructs a real `MetricsLogger`; other ranks get one with no backends (see `for_rank`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dist_train.checkpoint import TrainState
    from dist_train.config import Config
    from dist_train.distributed import ProcessPlace


class MetricsBackend(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def summary(self, summary: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null says "not a number" honestly.
    return value


class JsonlBackend:
    """Appends one JSON object per log step to RUN/metrics.jsonl; RUN/summary.json at the end."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh start (no checkpoint to resume) starts a fresh log.
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")
        os.replace(tmp, self.summary_path)

    def close(self) -> None:
        self._file.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a run killed after its last checkpoint logged steps that the resumed
    run trains again, and the log must hold each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, backends: list[MetricsBackend]):
        self.backends = backends

    def log(self, record: dict[str, Any]) -> None:
        for b in self.backends:
            b.log(record)

    def summary(self, summary: dict[str, Any]) -> None:
        for b in self.backends:
            b.summary(summary)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def build_logger(cfg: Config, run_dir: Path, place: ProcessPlace, state: TrainState,
                 resumed: bool) -> MetricsLogger:
    """Rank 0 logs to metrics.jsonl; other ranks get a logger without backends."""
    if not place.is_rank0:
        return MetricsLogger([])
    return MetricsLogger([JsonlBackend(run_dir, resume_step=state.step if resumed else None)])
