"""Checkpoints that survive a kill at any moment.

Layout under RUN/checkpoints/:
    step_00000100/            DeepSpeed's files (model + optimizer shards of every rank)
        client_rank00000.pt   this rank's loader position and RNG states
        client_state.json     step, tokens, config, model hash, W&B id (rank 0)
    latest                    text file naming the newest *complete* checkpoint; written last, atomically

A checkpoint is written into `.tmp_step_N/` and renamed into place only when every rank has finished, then
`latest` is replaced (write + fsync + os.replace). A kill before the rename leaves a `.tmp_*` folder that the
next start deletes; a kill after it leaves `latest` at the previous checkpoint. Old checkpoints are pruned
only after the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_train.config import SHAPE_KEYS, Config, ConfigError
from dist_train.distributed import ProcessPlace

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
    wandb_run_id: str | None = None
    """The W&B run this training continues."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    latest = checkpoint_dir / "latest"
    if not latest.exists():
        return None
    path = checkpoint_dir / latest.read_text().strip()
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


class Checkpointer:
    """Saves and restores engine + loader + RNG + train state; every rank calls every method."""

    def __init__(self, run_dir: Path, cfg: Config, engine: Any, place: ProcessPlace):
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg
        self.engine = engine
        self.place = place

    # -- save ------------------------------------------------------------------------------------------
    def save(self, state: TrainState, loader_state: dict[str, Any]) -> Path:
        tag = tag_for(state.step)
        tmp_root = self.dir / f".tmp_{tag}"
        final = self.dir / tag
        if self.place.is_rank0:
            shutil.rmtree(tmp_root, ignore_errors=True)
            tmp_root.mkdir(parents=True)
        _barrier()
        self.engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False)
        client = {"loader": loader_state, "rng": rng_state(), "world_size": self.place.world_size}
        torch.save(client, tmp_root / tag / f"client_rank{self.place.rank:05d}.pt")
        _barrier()
        if self.place.is_rank0:
            self._publish(tmp_root, tag, final, state)
        _barrier()
        return final

    def _publish(self, tmp_root: Path, tag: str, final: Path, state: TrainState) -> None:
        meta = {"train_state": dataclasses.asdict(state), "world_size": self.place.world_size,
                "model_hash": self.cfg.model_hash(), "config": self.cfg.to_dict()}
        _write_atomic(tmp_root / tag / CLIENT_STATE, json.dumps(meta, indent=2))
        if final.exists():
            # Left by a run killed between this rename and `latest`: it is not the latest, so replace it.
            shutil.rmtree(final)
        os.rename(tmp_root / tag, final)
        shutil.rmtree(tmp_root)  # DeepSpeed also drops its zero_to_fp32.py scripts here
        _write_atomic(self.dir / "latest", tag + "\n")
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        if self.cfg.checkpoint.keep_last <= 0:
            return
        complete = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in complete[:-self.cfg.checkpoint.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- resume ----------------------------------------------------------------------------------------
    def find(self, resume: str) -> Path | None:
        """`latest` (if any), `none`, or an explicit checkpoint folder."""
        if self.place.is_rank0 and self.dir.exists():
            for stale in self.dir.glob(".tmp_*"):
                shutil.rmtree(stale, ignore_errors=True)  # a save that a kill interrupted
        _barrier()
        if resume == "none":
            return None
        if resume == "latest":
            return read_latest(self.dir) if self.dir.exists() else None
        path = Path(resume)
        if not (path / CLIENT_STATE).exists():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {CLIENT_STATE})")
        return path

    def check_compatible(self, meta: dict[str, Any]) -> list[str]:
        """Refuse a model-shape change; return the other changed keys (allowed, to be logged)."""
        old, new = meta["config"], self.cfg.to_dict()
        broken = [f"model.{k}: {old['model'].get(k)!r} -> {new['model'].get(k)!r}"
                  for k in SHAPE_KEYS if old["model"].get(k) != new["model"].get(k)]
        if broken:
            raise ConfigError("the config changes the model's shape, so the checkpoint cannot be resumed: "
                              + "; ".join(broken) + ". Use a new run.out_dir or --resume none")
        return [f"{section}.{k}: {v!r} -> {new[section][k]!r}"
                for section, values in old.items() if isinstance(values, dict)
                for k, v in values.items() if new.get(section, {}).get(k) != v]

    def load(self, path: Path) -> tuple[TrainState, dict[str, Any], list[str]]:
        """Load engine state from `path`; return the train state, this rank's loader state, config changes."""
        meta = read_client_state(path)
        changes = self.check_compatible(meta)
        if meta["world_size"] != self.place.world_size:
            raise ConfigError(
                f"{path} was written by {meta['world_size']} processes and this run has "
                f"{self.place.world_size}: convert it with `python -m dist_train.reshard --checkpoint {path}` "
                f"or resume with the same number of processes")
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        client = torch.load(path / f"client_rank{self.place.rank:05d}.pt", weights_only=False)
        set_rng_state(client["rng"])
        return TrainState(**meta["train_state"]), client["loader"], changes
