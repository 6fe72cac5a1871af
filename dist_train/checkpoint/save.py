"""Saving a checkpoint so that a kill at any moment, or a full disk, leaves the last good one intact.

Every rank writes (and fsyncs, and measures) its shard into `.tmp_step_N/` (`dist_train.checkpoint.writer`); then
all ranks learn whether any write failed. If none did, rank 0 writes client_state.json and files.json (size and
sha256 of every file, `dist_train.checkpoint.verify`), renames the folder to `step_N/` and then replaces `latest`
(write + fsync + os.replace). A failed write (disk full, quota, file-size limit) removes the partial folder on
every rank's behalf and raises `SaveFailed` on every rank; `latest` still names the previous checkpoint.
A kill before the rename leaves a `.tmp_*` folder that the next start deletes; a kill after it leaves
`latest` at the previous checkpoint. Old checkpoints are pruned only after `latest` names the new one, and
are first renamed to `.trash_*` so a kill while deleting never leaves a half-deleted `step_N/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any


from dist_train.checkpoint import reshard
from dist_train.checkpoint.client_file import client_file, client_payload, load_client_file
from dist_train.checkpoint.layout import CLIENT_STATE, TrainState, read_client_state, read_latest_name, tag_for
from dist_train.checkpoint.resume import (
    ResumePlan,
    newest_verified,
    optimizer_layout_changes,
    set_aside_later_checkpoints,
)
from dist_train.checkpoint.rng import seed_rank_streams, set_rng_state
from dist_train.checkpoint.safe_load import checkpoint_reads
from dist_train.checkpoint.verify import write_files_list
from dist_train.checkpoint.writer import DISK_FULL_ERRNOS, FailedWrite, RankWriter, WriterEngine
from dist_train.config import Config
from dist_train.distributed.collectives import all_gather_objects
from dist_train.distributed.environment import ProcessPlace
from dist_train.distributed.rank0 import Rank0
from dist_train.formats.atomic_file import write_text_atomic


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


@dataclasses.dataclass
class _PendingSave:
    tag: str
    tmp_root: Path
    final: Path
    state: TrainState
    start: float
    writer: RankWriter


class SaveFailed(RuntimeError):
    """A save that wrote nothing usable: the partial folder is gone and `latest` names the previous checkpoint."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full
        """The cause was ENOSPC, EDQUOT or EFBIG (no space, quota, file-size limit)."""


class Checkpointer:
    """Saves and restores engine + loader + RNG + train state; every rank calls every method."""

    def __init__(self, run_dir: Path, cfg: Config, engine: Any, place: ProcessPlace):
        self.dir = run_dir / "checkpoints"
        self.cfg = cfg
        self.engine = engine
        self.place = place
        self.rank0 = Rank0(place)
        self._engine_writer = WriterEngine(engine.checkpoint_engine, RankWriter(place.rank))
        engine.checkpoint_engine = self._engine_writer
        self._pending: _PendingSave | None = None
        self.timings: dict[str, float] = {}
        """Seconds of the last save: `checkpoint_s` training stopped that long; when not async also this rank's
        writes (serialise, fsync, sha256) and waiting for the others + publishing (files.json, rename, latest)."""

    # -- save ------------------------------------------------------------------------------------------
    def save(self, state: TrainState, loader_state: dict[str, Any], wait: bool = True) -> Path:
        """Write and publish a checkpoint; raises SaveFailed on every rank if any rank's write failed. With
        checkpoint.async_save and not `wait`, returns once the state is snapshotted: the files are written in the
        background and published by a later `poll` or `finish` (which then raise SaveFailed instead)."""
        self.finish()  # one save at a time: an earlier one still being written is published first
        tag = tag_for(state.step)
        pending = _PendingSave(tag, self.dir / f".tmp_{tag}", self.dir / tag, dataclasses.replace(state),
                               time.perf_counter(), RankWriter(self.place.rank, self.cfg.checkpoint.async_save))
        self.rank0.run_while_others_wait(_fresh_folder, pending.tmp_root)
        writer = self._engine_writer.writer = pending.writer
        try:
            self.engine.save_checkpoint(str(pending.tmp_root), tag=tag, save_latest=False)
        except OSError as e:  # a write of DeepSpeed's own (its recovery script): reported like the others
            writer.error = writer.error or FailedWrite(f"rank {self.place.rank}: {e}", e.errno in DISK_FULL_ERRNOS)
        writer.save(client_payload(loader_state, self.place.world_size), client_file(pending.tmp_root / tag,
                                                                                     self.place.rank))
        self._pending = pending
        if wait or not self.cfg.checkpoint.async_save:
            self.finish()
        self.timings["checkpoint_s"] = time.perf_counter() - pending.start  # how long training stopped
        return pending.final

    def poll(self) -> None:
        """At a step boundary (every rank): publish the background save once every rank has written its files."""
        if self._pending is not None and all(all_gather_objects(self._pending.writer.done())):
            self.finish()

    def finish(self) -> None:
        """Wait for this rank's writes of the pending save, then check every rank's and publish (rank 0)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        writer, tag = pending.writer, pending.tag
        writer.wait()
        written = time.perf_counter()
        failures = [f for f in all_gather_objects(writer.error and (str(writer.error), writer.error.disk_full)) if f]
        if not failures:
            measured: dict[str, Any] = {}
            for entries in all_gather_objects(writer.entries_under(pending.tmp_root / tag)):
                measured.update(entries)
            published = self.rank0.share(self._publish, pending.tmp_root, tag, pending.final, pending.state, measured)
            failures = [published] if published else []
        if failures:
            self.rank0.run_while_others_wait(shutil.rmtree, pending.tmp_root, True)
            raise SaveFailed(f"checkpoint {tag} could not be written ({failures[0][0]}); the partial checkpoint "
                             f"was removed and {self.dir / 'latest'} still names "
                             f"{read_latest_name(self.dir) or 'no checkpoint'}",
                             disk_full=any(full for _, full in failures))
        # Where a blocking save's time goes (a background one's writes overlap training: only its stop counts).
        self.timings = {} if self.cfg.checkpoint.async_save else {
            "checkpoint_write_s": written - pending.start, "checkpoint_publish_s": time.perf_counter() - written}

    def _publish(self, tmp_root: Path, tag: str, final: Path, state: TrainState,
                 measured: dict[str, Any]) -> tuple[str, bool] | None:
        """Rank 0: list the files, rename the folder into place, point `latest` at it, prune. Returns the failure
        (message, disk full?) or None; on a failure nothing new is published."""
        meta = {"train_state": dataclasses.asdict(state), "world_size": self.place.world_size,
                "model_hash": self.cfg.model_hash(), "config": self.cfg.to_dict()}
        try:
            _fsync_tree(tmp_root / tag)
            write_text_atomic(tmp_root / tag / CLIENT_STATE, json.dumps(meta, indent=2))
            write_files_list(tmp_root / tag, measured)
            if final.exists():
                # Left by a run killed between this rename and `latest`: it is not the latest, so replace it.
                self._discard(final)
            os.rename(tmp_root / tag, final)
            shutil.rmtree(tmp_root)  # DeepSpeed also drops its zero_to_fp32.py scripts here
        except OSError as e:
            return f"rank 0 publishing {tag}: {e}", e.errno in DISK_FULL_ERRNOS
        try:
            write_text_atomic(self.dir / "latest", tag + "\n")
        except OSError as e:  # `latest` is intact (the new text goes to latest.tmp first): un-publish the folder
            (self.dir / "latest.tmp").unlink(missing_ok=True)
            self._discard(final)
            return f"rank 0 writing {self.dir / 'latest'}: {e}", e.errno in DISK_FULL_ERRNOS
        self._prune(keep=final)
        return None

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
    def load_before(self, step: int) -> tuple[tuple[TrainState, dict[str, Any]] | None, list[dict[str, Any]]]:
        """For a rollback: load the newest checkpoint of a step below `step` that verifies and was saved by this
        world size and expert-parallel layout (corrupt ones are moved to corrupt/, later ones to abandoned/).
        Returns what `load` does (None without such a checkpoint) and one event per corrupt checkpoint set aside."""
        self.finish()
        found, corrupt, _ = self.rank0.share(newest_verified, self.dir, self.cfg.checkpoint.verify, step)
        meta = read_client_state(found) if found is not None else None
        # Another world size loads through a universal conversion only, another MoE layout without its optimizer
        # state (a weights-only resume): a rollback restores the whole state or none.
        if (meta is None or meta["world_size"] != self.place.world_size
                or optimizer_layout_changes(found, meta, self.cfg, self.place.world_size)):
            return None, corrupt
        plan = ResumePlan(path=found, meta=meta, changes=[], world_changed=False, universal=False,
                          global_batch=(0, 0))
        loaded = self.load(plan)
        self.rank0.run_while_others_wait(set_aside_later_checkpoints, self.dir, loaded[0].step)
        return loaded, corrupt

    def load(self, plan: ResumePlan) -> tuple[TrainState, dict[str, Any]]:
        """Load engine, RNG and train state; return the train state and the loader state for this rank. Every
        file is read with safe_load (DeepSpeed's reads too), trusted only with checkpoint.trust."""
        trust = self.cfg.checkpoint.trust
        with checkpoint_reads(trust=trust):
            self._load_engine(plan)
        state = TrainState(**plan.meta["train_state"])
        if plan.world_changed:
            # The loader position is global (every rank saved the same one); old ranks do not map to new ones.
            client = load_client_file(client_file(plan.path, 0), trust=trust)
            seed_rank_streams(self.cfg.train.seed, state.step, self.place.rank)
        else:
            client = load_client_file(client_file(plan.path, self.place.rank), trust=trust)
            set_rng_state(client["rng"])
        return state, client["loader"]

    def _load_engine(self, plan: ResumePlan) -> None:
        if plan.universal:
            hyperparameters = reshard.group_hyperparameters(self.engine)
            self.engine.load_checkpoint(str(plan.path), tag=reshard.UNIVERSAL_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
            if self.cfg.deepspeed.zero_stage == 3:
                reshard.repair_zero3_optimizer(self.engine, hyperparameters)
            reshard.place_loaded_steps(self.engine)
        elif plan.weights_only:
            # DeepSpeed loads the module (each expert from its file by global id, for this run's expert-parallel
            # ranks), the lr schedule and its step counters, and copies the weights into ZeRO's fp32 partitions;
            # a ZeRO-0 fp16/bf16 optimizer's fp32 master weights are refreshed as DeepSpeed's module-only load does.
            self.engine.load_checkpoint(str(plan.path.parent), tag=plan.path.name, load_optimizer_states=False,
                                        load_lr_scheduler_states=True)
            refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None:
                refresh()
        else:
            self.engine.load_checkpoint(str(plan.path.parent), tag=plan.path.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
