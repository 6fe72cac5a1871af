"""Checkpoints that survive a kill at any moment and resume on any number of processes.

Layout under RUN/checkpoints/:
    step_00000100/            DeepSpeed's files (model + optimizer shards of every rank)
        client_rank00000.pt   this rank's loader position and RNG states (JSON + tensors: client_file)
        client_state.json     step, tokens, skipped steps, W&B run id, config, model hash (rank 0)
        files.json            size and sha256 of every file above (rank 0, written last; see verify.py)
        universal/            the same state cut per parameter, made on a resume with another world size
    latest                    text file naming the newest *complete* checkpoint; written last, atomically
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


def read_latest_name(checkpoint_dir: Path) -> str | None:
    """The folder name `latest` holds (it may be missing or incomplete), or None without a `latest`."""
    latest = checkpoint_dir / "latest"
    return latest.read_text().strip() if latest.exists() else None


def read_latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    latest = checkpoint_dir / "latest"
    name = read_latest_name(checkpoint_dir)
    if name is None:
        return None
    path = checkpoint_dir / name
    if not (path / CLIENT_STATE).exists():
        raise FileNotFoundError(f"{latest} names {path.name}, which is missing or incomplete; "
                                f"point --resume at another checkpoint folder")
    return path


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the latest one; errors say which run and which steps exist."""
    checkpoint_dir = run_dir / "checkpoints"
    if step is None:
        path = read_latest(checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet ({checkpoint_dir}/latest is missing)")
        return path
    path = checkpoint_dir / tag_for(step)
    if not (path / CLIENT_STATE).exists():
        steps = sorted(int(p.name[5:]) for p in checkpoint_dir.glob("step_*") if (p / CLIENT_STATE).exists())
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint of step {step}; it has steps {steps}")
    return path


def read_client_state(path: Path) -> dict[str, Any]:
    return json.loads((path / CLIENT_STATE).read_text())
