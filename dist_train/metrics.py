"""One logger interface, several backends: `metrics.jsonl` in the run folder always, W&B when enabled.

Only rank 0 constructs a logger with backends; other ranks get one with no backends (see `build_logger`).
`gather_rank_throughput` is the one collective here: every rank calls it at the same log step.

W&B runs are resumable: the run id lives in RUN/wandb_id.txt and in every checkpoint (`TrainState`), a
resumed or requeued job calls `wandb.init(id=..., resume="allow")`, and every record is logged with an
explicit `step=` so the steps continue monotonically across restarts.
"""

from __future__ import annotations

import json
import math
import secrets
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dist_train.formats.atomic_file import write_text_atomic
from dist_train.distributed import all_gather_objects

if TYPE_CHECKING:
    from dist_train.checkpoint import TrainState
    from dist_train.config import Config
    from dist_train.distributed import ProcessPlace

WANDB_ID_FILE = "wandb_id.txt"
PER_RANK_KEYS_MAX_WORLD = 64
"""Up to this many ranks, each rank's throughput is its own metric; beyond, only min/max/slowest rank
(thousands of per-rank series would drown the W&B workspace)."""


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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class WandbBackend:
    """Logs each record to a W&B run at `step=record["step"]`; records of one step merge into one row."""

    def __init__(self, run: Any, first_new_step: int):
        self.run = run
        self.first_new_step = first_new_step
        """Steps below this are already in the W&B run (logged before a kill): W&B keeps the first row of a
        step and refuses to go back, so they are not sent again."""

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step < self.first_new_step:
            return
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)

    def close(self) -> None:
        self.run.finish()


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
    from dist_train import wandb_reader

    run_id = resumed_wandb_id(run_dir, state, resumed) or new_wandb_id()
    state.wandb_run_id = run_id
    write_text_atomic(run_dir / WANDB_ID_FILE, run_id + "\n")
    held = wandb_reader.last_step(run_dir, run_id)
    run = _init_wandb_run(wandb, cfg, run_dir, run_id)
    backend = WandbBackend(run, first_new_step=0 if held is None else held + 1)
    for record in read_metrics(run_dir):
        backend.log(record)
    if run.offline:
        where = f"offline; upload later: wandb sync {Path(run.dir).parent}"
    else:
        where = f"online: {run.url}"
    print(f"W&B: run {run_id} ({run.name}), {where}", flush=True)
    return backend


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
    """Rank 0 logs to metrics.jsonl and, when enabled, W&B; other ranks get a logger without backends."""
    if not place.is_rank0:
        return MetricsLogger([])
    backends: list[MetricsBackend] = [JsonlBackend(run_dir, resume_step=state.step if resumed else None)]
    # After JsonlBackend: W&B's catch-up on resume reads the already truncated metrics.jsonl.
    wandb_backend = start_wandb(cfg, run_dir, state, resumed)
    if wandb_backend is not None:
        backends.append(wandb_backend)
    return MetricsLogger(backends)


class ForwardTimer:
    """Wall time of this rank's training forward passes, measured with hooks on the model.

    Why the forward pass: a data-parallel step ends in collectives, so every rank's *step* time is the slowest
    rank's; a forward pass (ZeRO 0-2) runs no collective, so its time is this rank's own speed and a
    straggler shows up. CUDA events time the GPU work without synchronizing each pass."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self._cuda = device.type == "cuda"
        self._open: Any = None
        self._pairs: list[tuple[Any, Any]] = []
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _now(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._open = self._now() if module.training else None  # evaluation is not training throughput

    def _stop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._open is not None:
            self._pairs.append((self._open, self._now()))
            self._open = None

    def take(self) -> tuple[float, int]:
        """(seconds, forward passes) since the last call."""
        pairs, self._pairs = self._pairs, []
        if self._cuda:
            if pairs:
                pairs[-1][1].synchronize()
            return sum(a.elapsed_time(b) for a, b in pairs) / 1e3, len(pairs)  # elapsed_time is in ms
        return sum(b - a for a, b in pairs), len(pairs)


def gather_rank_throughput(timer: ForwardTimer, tokens_per_forward: int) -> dict[str, Any]:
    """Each rank's forward throughput (tokens/s) gathered to every rank: min, max, the slowest rank and, up to
    PER_RANK_KEYS_MAX_WORLD ranks, one `fwd_tokens_per_s/rank_R` per rank. A collective: every rank calls it
    at the same step."""
    seconds, passes = timer.take()
    local = passes * tokens_per_forward / seconds if seconds > 0 else math.nan
    per_rank = [float(v) for v in all_gather_objects(local)]
    finite = [(v, r) for r, v in enumerate(per_rank) if math.isfinite(v)]
    if not finite:
        return {}
    slowest, slowest_rank = min(finite)
    record: dict[str, Any] = {"fwd_tokens_per_s_min": slowest, "fwd_tokens_per_s_max": max(finite)[0],
                              "slowest_rank": slowest_rank}
    if len(per_rank) <= PER_RANK_KEYS_MAX_WORLD:
        record.update({f"fwd_tokens_per_s/rank_{r}": v for r, v in enumerate(per_rank)})
    return record
