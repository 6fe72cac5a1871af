"""`metrics.jsonl`: one JSON object per log step in the run folder, written by rank 0 and read back by tools."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dist_train.config.quote import quote
from dist_train.formats.atomic_file import write_text_atomic


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

    def event(self, record: dict[str, Any]) -> None:
        self.log(record)

    def rewind(self, step: int) -> None:
        """Drop the lines after `step`, which will be trained again (each step is logged once)."""
        self._file.close()
        truncate_after(self.path, step)
        self._file = open(self.path, "a")  # noqa: SIM115 - truncate_after replaced the file

    def summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n"
        write_text_atomic(self.summary_path, text)

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
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class MetricsFileError(ValueError):
    """A `metrics.jsonl` with a line that is not a JSON object, other than a last line cut by a kill."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl ([] without one). A last line cut by a kill is skipped, as a resume
    drops it (`truncate_after`); any other line that is not a JSON object is refused, naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                break  # the line being written when the run was killed
            record = None
        if not isinstance(record, dict):
            raise MetricsFileError(f"{path}, line {i + 1} is not a JSON object: {quote(line)}")
        records.append(record)
    return records
