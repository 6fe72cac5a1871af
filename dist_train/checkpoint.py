"""Checkpoints that survive a kill at any moment and resume on any number of processes.

Layout under RUN/checkpoints/:
    step_00000100/            DeepSpeed's files (model + optimizer shards of every rank)
        client_rank00000.pt   this rank's loader position and RNG states
        client_state.json     step, tokens, skipped steps, W&B run id, config, model hash (rank 0, written last)
        universal/            the same state cut per parameter, made on a resume with another world size
    latest                    text file naming the newest *complete* checkpoint; written last, atomically

Saving. Every rank writes its shard into `.tmp_step_N/`; after a barrier rank 0 fsyncs the files, writes
client_state.json, renames the folder to `step_N/` and then replaces `latest` (write + fsync + os.replace).
A kill before the rename leaves a `.tmp_*` folder that the next start deletes; a kill after it leaves
`latest` at the previous checkpoint. Old checkpoints are pruned only after `latest` names the new one, and
are first renamed to `.trash_*` so a kill while deleting never leaves a half-deleted `step_N/`.

Resuming. `--resume latest` (the default; nothing to resume starts fresh), `none`, or a checkpoint folder.
A config that changes the tensors (model shape keys, and seq_len for learned positions), the ZeRO stage or the
precision is refused before any engine starts; any other change (lr, max_steps, ...) is allowed and printed.

World size. The data loader's position is global (`consumed_samples`, equal on every rank): optimizer step s of
a run with global batch G reads global samples [s*G, (s+1)*G) whatever the number of processes, so every rank
of the resumed run takes that position. Keep the global batch (set train.global_batch_size: grad_accum_steps
is then derived for each world size) and every resumed step reads exactly the samples of the uninterrupted
run; with another global batch the stream still continues with no sample repeated or skipped. The ZeRO
optimizer shards are re-cut through DeepSpeed's universal format (`dist_train.reshard`); RNG states are
re-seeded from (seed, step, rank), since old and new ranks do not correspond (this only matters for dropout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_train import reshard
from dist_train.formats.atomic_file import write_text_atomic
from dist_train.config import SHAPE_KEYS, Config, ConfigError
from dist_train.distributed import ProcessPlace, Rank0

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


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


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


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Config changes that make a checkpoint unloadable: tensor shapes, ZeRO stage, precision."""
    keys = [("model", k) for k in SHAPE_KEYS]
    if "learned" in (old["model"].get("pos"), new["model"].get("pos")):
        keys.append(("model", "seq_len"))  # the learned position table has seq_len rows
    keys += [("deepspeed", "zero_stage"), ("precision", None)]
    changed = []
    for section, key in keys:
        before = old.get(section) if key is None else old.get(section, {}).get(key)
        after = new.get(section) if key is None else new.get(section, {}).get(key)
        if before != after:
            changed.append(f"{section}{'.' + key if key else ''}: {before!r} -> {after!r}")
    return changed


def allowed_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for section, values in new.items():
        before = old.get(section)
        if isinstance(values, dict) and isinstance(before, dict):
            changes += [f"{section}.{k}: {before.get(k)!r} -> {v!r}" for k, v in values.items() if before.get(k) != v]
        elif before != values:
            changes.append(f"{section}: {before!r} -> {values!r}")
    return changes


@dataclass
class ResumePlan:
    path: Path
    """The checkpoint folder to load."""
    meta: dict[str, Any]
    """Its client_state.json."""
    changes: list[str]
    """Config changes since the checkpoint (allowed ones; breaking ones were refused)."""
    world_changed: bool
    """Saved with another number of processes."""
    universal: bool
    """Load `path/universal` with DeepSpeed's load_universal (a ZeRO 1-3 checkpoint on another world size)."""
    global_batch: tuple[int, int]
    """Sequences per optimizer step (saved run, this run)."""

    def describe(self) -> str:
        step, world = self.meta["train_state"]["step"], self.meta["world_size"]
        text = f"resumed from {self.path} at step {step}"
        if self.world_changed:
            text += f" (saved by {world} processes, re-sharded{' via the universal format' if self.universal else ''})"
        if self.global_batch[0] != self.global_batch[1]:
            text += (f"; global batch {self.global_batch[0]} -> {self.global_batch[1]} sequences: the data continues "
                     f"without repeats or gaps, but not step for step (set train.global_batch_size to keep it)")
        return text + (f"; config changes: {'; '.join(self.changes)}" if self.changes else "")


def global_batch(cfg: dict[str, Any], world_size: int) -> int:
    t = cfg["train"]
    return t.get("global_batch_size") or t["micro_batch_size"] * t["grad_accum_steps"] * world_size


def find_checkpoint(run_dir: Path, resume: str, place: ProcessPlace) -> Path | None:
    """`latest` (if any), `none`, or an explicit checkpoint folder; first removes what a kill interrupted."""
    checkpoint_dir = run_dir / "checkpoints"
    rank0 = Rank0(place)
    rank0.run_while_others_wait(remove_interrupted_writes, checkpoint_dir)
    if resume == "none":
        existing = read_latest(checkpoint_dir) if checkpoint_dir.exists() else None
        if existing is not None:  # starting over would mix two runs' checkpoints (and averages of them)
            raise ConfigError(f"--resume none: {run_dir} already holds checkpoints (latest {existing.name}); "
                              f"choose another run.out_dir, or delete {checkpoint_dir} to start over")
        return None
    if resume == "latest":
        return read_latest(checkpoint_dir) if checkpoint_dir.exists() else None
    path = Path(resume)
    if not (path / CLIENT_STATE).exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {CLIENT_STATE})")
    rank0.run_while_others_wait(set_aside_later_checkpoints, checkpoint_dir,
                                read_client_state(path)["train_state"]["step"])
    return path


def remove_interrupted_writes(checkpoint_dir: Path) -> None:
    """What a kill left behind: a save (`.tmp_*`), a prune (`.trash_*`) or a universal conversion."""
    if not checkpoint_dir.exists():
        return
    for stale in [*checkpoint_dir.glob(".tmp_*"), *checkpoint_dir.glob(".trash_*"),
                  *checkpoint_dir.glob("step_*/.universal_tmp")]:
        shutil.rmtree(stale, ignore_errors=True)


def set_aside_later_checkpoints(checkpoint_dir: Path, start_step: int) -> list[Path]:
    """A resume from an earlier step (a roll-back past a loss spike) abandons the later checkpoints: move them
    to `checkpoints/abandoned/` (kept, but no longer seen by `latest`, pruning or averaging)."""
    later = sorted(p for p in checkpoint_dir.glob("step_*") if p.is_dir() and int(p.name[5:]) > start_step)
    if not later:
        return []
    aside = checkpoint_dir / "abandoned"
    aside.mkdir(exist_ok=True)
    moved = []
    for p in later:
        target = aside / p.name
        suffix = 1
        while target.exists():
            target, suffix = aside / f"{p.name}.{suffix}", suffix + 1
        os.rename(p, target)
        moved.append(target)
    start = checkpoint_dir / tag_for(start_step)
    if (start / CLIENT_STATE).exists():
        write_text_atomic(checkpoint_dir / "latest", start.name + "\n")
    else:
        (checkpoint_dir / "latest").unlink(missing_ok=True)
    print(f"resuming from step {start_step}: moved later checkpoints to {aside}: "
          f"{', '.join(p.name for p in moved)}", flush=True)
    return moved


def plan_resume(run_dir: Path, cfg: Config, place: ProcessPlace, resume: str) -> ResumePlan | None:
    """Find the checkpoint to resume, refuse an incompatible config, and (rank 0, the others wait) convert a
    ZeRO checkpoint of another world size to the universal format. Runs before the engine is built, because
    a universal load must be switched on in the DeepSpeed config."""
    path = find_checkpoint(run_dir, resume, place)
    if path is None:
        return None
    meta = read_client_state(path)
    broken = breaking_changes(meta["config"], cfg.to_dict())
    if broken:
        raise ConfigError(f"{path} cannot be resumed with this config: {'; '.join(broken)}. Restore these "
                          f"settings, or start a new run (another run.out_dir, or --resume none)")
    world_changed = meta["world_size"] != place.world_size
    universal = world_changed and reshard.is_zero_checkpoint(path)
    if universal:
        Rank0(place).run_while_others_wait(reshard.convert_to_universal, path)
    return ResumePlan(path=path, meta=meta, changes=allowed_changes(meta["config"], cfg.to_dict()),
                      world_changed=world_changed, universal=universal,
                      global_batch=(global_batch(meta["config"], meta["world_size"]),
                                    global_batch(cfg.to_dict(), place.world_size)))


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
            seed = self.cfg.train.seed * 1_000_003 + state.step * 1_009 + self.place.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        else:
            client = torch.load(plan.path / f"client_rank{self.place.rank:05d}.pt", weights_only=False)
            set_rng_state(client["rng"])
        return state, client["loader"]
