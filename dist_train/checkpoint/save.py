"""Saving a checkpoint so that a kill at any moment leaves the last good one intact.

Every rank writes its shard into `.tmp_step_N/`; after a barrier rank 0 fsyncs the files, writes
client_state.json, renames the folder to `step_N/` and then replaces `latest` (write + fsync + os.replace).
A kill before the rename leaves a `.tmp_*` folder that the next start deletes; a kill after it leaves
`latest` at the previous checkpoint. Old checkpoints are pruned only after `latest` names the new one, and
are first renamed to `.trash_*` so a kill while deleting never leaves a half-deleted `step_N/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_train.checkpoint import reshard
from dist_train.checkpoint.layout import CLIENT_STATE, TrainState, tag_for
from dist_train.checkpoint.resume import ResumePlan
from dist_train.checkpoint.rng import rng_state, seed_rank_streams, set_rng_state
from dist_train.config import Config
from dist_train.distributed.environment import ProcessPlace
from dist_train.distributed.rank0 import Rank0
from dist_train.formats.atomic_file import write_text_atomic


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file (and folder entry) under root to disk before the rename publishes it: without it a
    power loss shortly after could leave a published checkpoint with empty files."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Checkpointer:
    """Saves and restores engine + loader + RNG + train state; every rank calls every method."""

    def __init__(self, run_dir: Path, cfg: Config, engine: Any, place: ProcessPlace):
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg
        self.engine = engine
        self.place = place
        self.rank0 = Rank0(place)

    # -- save ------------------------------------------------------------------------------------------
    def save(self, state: TrainState, loader_state: dict[str, Any]) -> Path:
        tag = tag_for(state.step)
        tmp_root = self.dir / f".tmp_{tag}"
        final = self.dir / tag
        self.rank0.run_while_others_wait(_fresh_folder, tmp_root)
        self.engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False)
        client = {"loader": loader_state, "rng": rng_state(), "world_size": self.place.world_size}
        torch.save(client, tmp_root / tag / f"client_rank{self.place.rank:05d}.pt")
        _barrier()
        try:  # disk full or an fsync failure on rank 0 stops every rank (`latest` names the previous one)
            self.rank0.run_while_others_wait(self._publish, tmp_root, tag, final, state)
        except RuntimeError as e:
            raise RuntimeError(f"saving checkpoint {final} failed: {e}; `latest` still names the previous "
                               f"checkpoint") from None
        return final

    def _publish(self, tmp_root: Path, tag: str, final: Path, state: TrainState) -> None:
        meta = {"train_state": dataclasses.asdict(state), "world_size": self.place.world_size,
                "model_hash": self.cfg.model_hash(), "config": self.cfg.to_dict()}
        _fsync_tree(tmp_root / tag)
        write_text_atomic(tmp_root / tag / CLIENT_STATE, json.dumps(meta, indent=2))
        if final.exists():
            # Left by a run killed between this rename and `latest`: it is not the latest, so replace it.
            self._discard(final)
        os.rename(tmp_root / tag, final)
        shutil.rmtree(tmp_root)  # DeepSpeed also drops its zero_to_fp32.py scripts here
        write_text_atomic(self.dir / "latest", tag + "\n")
        self._prune(keep=final)

    def _discard(self, path: Path) -> None:
        """Rename, then delete: a kill mid-delete leaves a `.trash_*` folder, never a half `step_*` one."""
        trash = self.dir / f".trash_{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        if self.cfg.checkpoint.keep_last <= 0:
            return
        complete = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in complete[:-self.cfg.checkpoint.keep_last]:
            if old != keep:
                self._discard(old)

    # -- resume ----------------------------------------------------------------------------------------
    def load(self, plan: ResumePlan) -> tuple[TrainState, dict[str, Any]]:
        """Load engine, RNG and train state; return the train state and the loader state for this rank."""
        if plan.universal:
            hyperparameters = reshard.group_hyperparameters(self.engine)
            self.engine.load_checkpoint(str(plan.path), tag=reshard.UNIVERSAL_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
            if self.cfg.deepspeed.zero_stage == 3:
                reshard.repair_zero3_optimizer(self.engine, hyperparameters)
        else:
            self.engine.load_checkpoint(str(plan.path.parent), tag=plan.path.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
        state = TrainState(**plan.meta["train_state"])
        if plan.world_changed:
            # The loader position is global (every rank saved the same one); old ranks do not map to new ones.
            client = torch.load(plan.path / "client_rank00000.pt", weights_only=False)
            seed_rank_streams(self.cfg.train.seed, state.step, self.place.rank)
        else:
            client = torch.load(plan.path / f"client_rank{self.place.rank:05d}.pt", weights_only=False)
            set_rng_state(client["rng"])
        return state, client["loader"]
