"""The W&B backend, resumable: the run id lives in RUN/wandb_id.txt and in every checkpoint (`TrainState`), a
resumed or requeued job calls `wandb.init(id=..., resume="allow")`, and every record is logged with an
explicit `step=` so the steps continue monotonically across restarts.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_train.formats.atomic_file import write_text_atomic
from dist_train.monitor.jsonl import read_metrics

if TYPE_CHECKING:
    from dist_train.checkpoint.layout import TrainState
    from dist_train.config import Config


WANDB_ID_FILE = "wandb_id.txt"


class WandbBackend:
    """Logs each record to a W&B run at `step=record["step"]`; records of one step merge into one row.

    A dashboard must never stop a training job: when W&B fails (its service process died - SLURM's TERM on a
    requeue or preemption reaches every process of the job, wandb-core included - or its disk filled), the
    failure is said once and W&B is left alone for the rest of this start; metrics.jsonl has every record, and
    the next start re-sends what the W&B files lack."""

    def __init__(self, run: Any, first_new_step: int):
        self.run: Any | None = run
        self.first_new_step = first_new_step
        """Steps below this are already in the W&B run (logged before a kill): W&B keeps the first row of a
        step and refuses to go back, so they are not sent again."""
        self.last_step = first_new_step - 1

    def _call(self, what: str, fn: Any) -> None:
        if self.run is None:
            return
        try:
            fn(self.run)
        except Exception as e:  # noqa: BLE001 - a dashboard must never stop a training job
            self.run = None
            print(f"W&B: {what} failed ({type(e).__name__}: {e}); W&B logging stops for this start, "
                  f"metrics.jsonl has every record and the next start sends W&B what it lacks", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step < self.first_new_step or self.run is None:
            return
        self._call(f"logging step {step}", lambda run: run.log(_row(record), step=step))
        self.last_step = step

    def event(self, record: dict[str, Any]) -> None:
        """At the run's current step when the event's is older (W&B drops rows that go back): it happened now."""
        step = max(record["step"], self.last_step)
        self._call(f"logging event {record['event']!r}", lambda run: run.log(_row(record), step=step))

    def rewind(self, step: int) -> None:
        """W&B cannot take rows for steps it already has: the retrained steps up to the last logged one are not
        sent (metrics.jsonl holds them); logging continues with the steps after it."""
        self.first_new_step = max(self.first_new_step, self.last_step + 1)

    def summary(self, summary: dict[str, Any]) -> None:
        self._call("writing the summary", lambda run: run.summary.update(summary))

    def close(self) -> None:
        self._call("finishing the run", lambda run: run.finish())


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record as a W&B row; an event's numbers become `<event>/<key>` (its text stays in
    metrics.jsonl and the printed message), plus `<event>/count` = 1 to mark it on a chart."""
    if "event" not in record:
        return {k: v for k, v in record.items() if k != "step"}
    name = record["event"]
    row = {f"{name}/{k}": v for k, v in record.items()
           if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**row, f"{name}/count": 1}


def wandb_run_name(cfg: Config) -> str:
    return cfg.wandb.name or cfg.run.name or Path(cfg.run.out_dir).resolve().name


def new_wandb_id() -> str:
    """8 random lowercase letters and digits, the shape of W&B's own ids (wandb 0.31 dropped its helper)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def resumed_wandb_id(run_dir: Path, state: TrainState, resumed: bool) -> str | None:
    """The W&B run a resumed job continues: the checkpoint's, else the run folder's. A fresh start (no
    checkpoint) starts a new W&B run, just as it starts a new metrics.jsonl."""
    if not resumed:
        return None
    id_file = run_dir / WANDB_ID_FILE
    return state.wandb_run_id or (id_file.read_text().strip() if id_file.exists() else None)


def _init_wandb_run(wandb: Any, cfg: Config, run_dir: Path, run_id: str) -> Any:
    w = cfg.wandb
    kwargs = {"project": w.project, "entity": w.entity, "name": wandb_run_name(cfg), "tags": list(w.tags),
              "config": cfg.to_dict(), "id": run_id, "resume": "allow", "dir": str(run_dir)}
    if w.mode == "online":
        try:
            return wandb.init(mode="online", **kwargs)
        except Exception as e:  # noqa: BLE001 - a dashboard must never stop a training job
            print(f"W&B: online init failed ({type(e).__name__}: {e}); logging offline instead. Check "
                  f"WANDB_API_KEY / `wandb login`; upload later with "
                  f"`wandb sync {run_dir}/wandb/offline-run-*`", flush=True)
    # Offline in the process-wide settings too: with only init(mode="offline"), wandb 0.31 still contacts its
    # server from a telemetry thread.
    wandb.setup(settings=wandb.Settings(mode="offline", silent=True))
    return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)


def start_wandb(cfg: Config, run_dir: Path, state: TrainState, resumed: bool) -> WandbBackend | None:
    """A W&B backend when `wandb.enabled` and the package is installed (else None: training runs unchanged).

    Sets `state.wandb_run_id` (saved with every checkpoint) and RUN/wandb_id.txt. On resume, the rows that
    the W&B files lack but metrics.jsonl holds (the killed process had not flushed them) are sent first."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("W&B: wandb.enabled is true but the wandb package is not installed; logging to metrics.jsonl "
              "only (pip install wandb)", flush=True)
        return None
    from dist_train.monitor import wandb_reader

    run_id = resumed_wandb_id(run_dir, state, resumed) or new_wandb_id()
    state.wandb_run_id = run_id
    write_text_atomic(run_dir / WANDB_ID_FILE, run_id + "\n")
    try:
        held = wandb_reader.last_step(run_dir, run_id)
        first_new_step = 0 if held is None else held + 1
    except Exception as e:  # noqa: BLE001 - a dashboard must never stop a training job
        # Without knowing what W&B holds, re-sending could repeat rows: send only what this start trains.
        first_new_step = state.step + 1
        print(f"W&B: could not read the files of run {run_id} in {run_dir / 'wandb'} ({type(e).__name__}: {e}); "
              f"not re-sending earlier rows, so W&B may lack some before step {first_new_step} "
              f"(metrics.jsonl has every one)", flush=True)
    run = _init_wandb_run(wandb, cfg, run_dir, run_id)
    backend = WandbBackend(run, first_new_step=first_new_step)
    for record in read_metrics(run_dir):
        backend.log(record)
    if run.offline:
        where = f"offline; upload later: wandb sync {Path(run.dir).parent}"
    else:
        where = f"online: {run.url}"
    print(f"W&B: run {run_id} ({run.name}), {where}", flush=True)
    return backend
