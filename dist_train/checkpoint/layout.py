"""Checkpoints that survive a kill at any moment and resume on any number of processes.

Layout under RUN/checkpoints/:
    step_00000100/            DeepSpeed's files (model + optimizer shards of every rank)
        client_rank00000.pt   this rank's loader position and RNG states (JSON + tensors: client_file)
        client_state.json     step, tokens, skipped steps, W&B run id, config, model hash (rank 0)
        files.json            size and sha256 of every file above (rank 0, written last; see verify.py)
        universal/            the same state cut per parameter, made on a resume with another world size
    latest                    text file naming the newest *complete* checkpoint; written last, atomically. Only a
                              `step_NNNNNNNN` name is followed; anything else is a broken pointer, never a path
    corrupt/                  checkpoints that failed verification on a resume (moved here, never loaded)
    abandoned/                checkpoints after the step a resume or a loss-spike rollback went back to

World size. The data loader's position is global (`consumed_samples`, equal on every rank): optimizer step s of
a run with global batch G reads global samples [s*G, (s+1)*G) whatever the number of processes, so every rank
of the resumed run takes that position. Keep the global batch (set train.global_batch_size: grad_accum_steps
is then derived for each world size) and every resumed step reads exactly the samples of the uninterrupted
run; with another global batch the stream still continues with no sample repeated or skipped. The ZeRO
optimizer shards are re-cut through DeepSpeed's universal format (`dist_train.checkpoint.reshard`); RNG states are
re-seeded from (seed, step, rank), since old and new ranks do not correspond (this only matters for dropout).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLIENT_STATE = "client_state.json"


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    tokens: int = 0
    """Training tokens consumed over all ranks."""
    consecutive_bad_steps: int = 0
    """Steps in a row whose loss was not finite (each was skipped)."""
    skipped_steps: int = 0
    """All steps skipped for a non-finite loss."""
    wall_s: float = 0.0
    """Seconds spent in this run's training invocations, summed over restarts."""
    last_loss: float = math.nan
    """Training loss of the last applied step (for the summary of a run resumed at its end)."""
    wandb_run_id: str | None = None
    """The W&B run this training continues."""
    rollbacks: int = 0
    """Loss-spike rollbacks so far (at most train.max_rollbacks); carried over the rollback's own reload."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


LATEST = "latest"
_STEP_NAME = re.compile(r"step_[0-9]{8}")
_LATEST_READ_BYTES = 256
"""A pointer is a folder name of 13 characters: read no more of a `latest` that holds something else."""


def is_step_name(name: str) -> bool:
    """A checkpoint folder's name, `step_NNNNNNNN`. Nothing else in `latest` is followed: not a path (absolute, or
    through `..`), not an empty line, which joined to checkpoints/ would name a folder outside the checkpoints."""
    return _STEP_NAME.fullmatch(name) is not None


def step_of(path: Path) -> int:
    return int(path.name[len("step_"):])


def step_folders(checkpoint_dir: Path) -> list[Path]:
    """The `step_NNNNNNNN` folders directly in `checkpoint_dir` (complete or not), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if is_step_name(p.name) and p.is_dir())


def read_latest_name(checkpoint_dir: Path) -> str | None:
    """What `latest` holds, stripped, or None without a `latest`. Only a name that `is_step_name` accepts is a
    pointer; anything else is a broken one (`broken_latest`)."""
    latest = checkpoint_dir / LATEST
    if not latest.exists():
        return None
    with open(latest, "rb") as f:
        return f.read(_LATEST_READ_BYTES).decode("utf-8", errors="replace").strip()


def broken_latest(checkpoint_dir: Path, text: str) -> str:
    """What is wrong with a `latest` holding `text` (not a checkpoint folder name); the text is cut short."""
    shown = repr(text[:200]) + ("..." if len(text) > 200 else "")
    return (f"{checkpoint_dir / LATEST} holds {shown}, not the name of a checkpoint folder in {checkpoint_dir} "
            f"(step_NNNNNNNN): a broken pointer")


def read_latest(checkpoint_dir: Path) -> Path | None:
    """The checkpoint folder `latest` names, or None without a `latest`. FileNotFoundError for a broken pointer
    or a folder that is missing or incomplete."""
    name = read_latest_name(checkpoint_dir)
    if name is None:
        return None
    if not is_step_name(name):
        raise FileNotFoundError(broken_latest(checkpoint_dir, name))
    path = checkpoint_dir / name
    if not (path / CLIENT_STATE).exists():
        raise FileNotFoundError(f"{checkpoint_dir / LATEST} names {path.name}, which is missing or incomplete")
    return path


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """Steps of the checkpoint folders that hold a client_state.json (published, though not verified here)."""
    return [step_of(p) for p in step_folders(checkpoint_dir) if (p / CLIENT_STATE).exists()]


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the latest one; errors say which run and which steps exist."""
    checkpoint_dir = run_dir / "checkpoints"
    if step is None:
        try:
            path = read_latest(checkpoint_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; pass --step N, one of the complete checkpoints of {run_dir}: steps "
                                    f"{complete_steps(checkpoint_dir)}") from None
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet ({checkpoint_dir}/latest is missing)")
        return path
    path = checkpoint_dir / tag_for(step)
    if not (path / CLIENT_STATE).exists():
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint of step {step}; it has steps "
                                f"{complete_steps(checkpoint_dir)}")
    return path


def read_client_state(path: Path) -> dict[str, Any]:
    return json.loads((path / CLIENT_STATE).read_text())
