"""Where a resume starts and what it may change.

`--resume latest` (the default; nothing to resume starts fresh), `none`, or a checkpoint folder. A config that
changes the tensors (model shape keys), the ZeRO stage, the precision or the training sample stream (seed, seq_len,
the data: `dist_train.data.stream`) is refused before any engine starts; any other change (lr, max_steps, ...) is
allowed and printed. A resume on another world size goes through universal checkpoints
(`dist_train.checkpoint.reshard`). An MoE checkpoint whose optimizer state DeepSpeed cannot re-cut for this run
(another `parallel.expert`, or another world size at parallel.expert > 1 under ZeRO 1-2) is refused too, unless
`checkpoint.resume_weights_only` (`--resume-weights-only`) asks for its weights and training state alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dist_train.checkpoint import reshard, safe_load
from dist_train.checkpoint.layout import (
    CLIENT_STATE,
    LATEST,
    broken_latest,
    is_step_name,
    read_client_state,
    read_latest,
    read_latest_name,
    step_folders,
    step_of,
    tag_for,
)
from dist_train.checkpoint.verify import CORRUPT_DIR, CorruptCheckpoint, quarantine
from dist_train.checkpoint.verify import check as verify_checkpoint
from dist_train.config import SHAPE_KEYS, Config, ConfigError
from dist_train.data.stream import stream_changes
from dist_train.distributed.collectives import all_gather_objects
from dist_train.distributed.environment import ProcessPlace
from dist_train.distributed.rank0 import Rank0
from dist_train.formats.atomic_file import write_text_atomic

VerifyMode = Literal["full", "sizes"]


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Config changes that make a checkpoint unloadable: tensor shapes, ZeRO stage, precision (and, for bf16
    ZeRO-1, the gradient-accumulation dtype)."""
    keys = [("model", k) for k in SHAPE_KEYS]
    if "learned" in (old["model"].get("pos"), new["model"].get("pos")):
        keys.append(("model", "seq_len"))  # the learned position table has seq_len rows
    # A tensor-parallel checkpoint holds each rank's shard of the sharded layers; a sequence-parallel one
    # partitions ZeRO states over all ranks of the group. DeepSpeed's universal checkpoints are not yet used here
    # to re-cut either, so a layout change is refused (a data-parallel change is re-sharded, see `reshard`).
    keys += [("deepspeed", "zero_stage"), ("precision", None), ("parallel", "tensor"), ("parallel", "sequence")]
    old = {"parallel": {"tensor": 1, "sequence": 1}, **old}  # saved before parallel.* existed: plain data parallel
    old["model"] = {"qk_norm": False, **old["model"]}  # saved before model.qk_norm existed: no q/k norms
    if new.get("precision") == "bf16" and new.get("deepspeed", {}).get("zero_stage") == 1:
        # bf16 ZeRO-1 with fp32 accumulation runs DeepSpeed's BF16_Optimizer, whose checkpoint the ZeRO-1
        # optimizer of bf16 accumulation cannot load, nor the other way round.
        keys.append(("deepspeed", "grad_accum_dtype"))
    changed = []
    # The MoE tensors: how many experts, in which blocks, the shared MLP's width (absent before model.moe existed).
    for key, default in (("num_experts", 0), ("every", 1), ("shared_experts", 0)):
        before = old["model"].get("moe", {}).get(key, default)
        after = new["model"].get("moe", {}).get(key, default)
        if before != after:
            changed.append(f"model.moe.{key}: {before!r} -> {after!r}")
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
    events: list[dict[str, Any]] = field(default_factory=list)
    """Corrupt checkpoints set aside on the way, a weights-only resume (for metrics.jsonl and W&B)."""
    weights_only: list[str] = field(default_factory=list)
    """The layout changes that keep the optimizer state from loading (`optimizer_layout_changes`); when any, only
    the weights, the step, the data position and the lr schedule are loaded (checkpoint.resume_weights_only)."""

    def describe(self) -> str:
        step, world = self.meta["train_state"]["step"], self.meta["world_size"]
        text = f"resumed from {self.path} at step {step}"
        if self.weights_only:
            text += f" (weights only, the optimizer state starts fresh: {'; '.join(self.weights_only)})"
        elif self.world_changed:
            text += f" (saved by {world} processes, re-sharded{' via the universal format' if self.universal else ''})"
        if self.global_batch[0] != self.global_batch[1]:
            text += (f"; global batch {self.global_batch[0]} -> {self.global_batch[1]} sequences: the data continues "
                     f"without repeats or gaps, but not step for step (set train.global_batch_size to keep it)")
        return text + (f"; config changes: {'; '.join(self.changes)}" if self.changes else "")


def global_batch(cfg: dict[str, Any], world_size: int) -> int:
    t = cfg["train"]
    return t.get("global_batch_size") or t["micro_batch_size"] * t["grad_accum_steps"] * world_size


def find_checkpoint(run_dir: Path, resume: str, place: ProcessPlace, verify: VerifyMode = "full",
                    events: list[dict[str, Any]] | None = None) -> Path | None:
    """`latest` (if any), `none`, or an explicit checkpoint folder, verified against its files.json; first removes
    what a kill interrupted. A corrupt `latest` is moved to checkpoints/corrupt/, a broken one (not a step_NNNNNNNN
    name) is ignored, and the newest checkpoint that verifies is taken instead (each such event is appended to
    `events`); a corrupt explicit folder is refused."""
    checkpoint_dir = run_dir / "checkpoints"
    rank0 = Rank0(place)
    rank0.run_while_others_wait(remove_interrupted_writes, checkpoint_dir)
    if resume == "latest":
        found, moved, refusal = rank0.share(newest_verified, checkpoint_dir, verify, None)
        if events is not None:
            events.extend(moved)
        if refusal:
            raise CorruptCheckpoint(refusal)
        return found
    path = resume_target(run_dir, resume)
    if path is None:
        return None
    problem = rank0.share(check_quietly, path, verify)
    if problem:
        raise CorruptCheckpoint(f"--resume {resume}: refused, the checkpoint is corrupt: {problem}. Resume from "
                                f"another checkpoint folder (or `--resume latest`)")
    rank0.run_while_others_wait(set_aside_later_checkpoints, checkpoint_dir,
                                read_client_state(path)["train_state"]["step"])
    return path


def resume_target(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder `--resume` names (None: start fresh); reads only, so every rank may call it
    before any process group starts. Refuses a folder that is no complete checkpoint, and `none` where
    checkpoints exist (starting over would mix two runs' checkpoints, and averages of them)."""
    checkpoint_dir = run_dir / "checkpoints"
    if resume == "none":
        existing = read_latest_name(checkpoint_dir) if checkpoint_dir.exists() else None
        if existing is not None:
            shown = f"latest {existing}" if is_step_name(existing) else "its latest is a broken pointer"
            raise ConfigError(f"--resume none: {run_dir} already holds checkpoints ({shown}); "
                              f"start the new run in its own folder (run.out_dir={_sibling(run_dir)}), or "
                              f"delete {checkpoint_dir} to start over here")
        return None
    if resume == "latest":
        try:
            return read_latest(checkpoint_dir) if checkpoint_dir.exists() else None
        except FileNotFoundError:
            # A broken pointer or a half-synced copy: the run starts from the newest checkpoint that verifies
            # (decided by `newest_verified`, which reads every byte); the newest complete one is the likely one.
            complete = [p for p in step_folders(checkpoint_dir) if (p / CLIENT_STATE).exists()]
            return complete[-1] if complete else None
    path = Path(resume)
    if not (path / CLIENT_STATE).exists():
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {CLIENT_STATE})"
        steps = [p for p in step_folders(checkpoint_dir) if (p / CLIENT_STATE).exists()]
        hint = (f"checkpoints of {run_dir}: {', '.join(str(p) for p in steps)}" if steps
                else f"{run_dir} has no checkpoint yet")
        raise ConfigError(f"--resume {resume}: {path} {what}; pass a checkpoint folder ({hint}), "
                          f"`latest` (the default) or `none`")
    return path


def _sibling(run_dir: Path) -> str:
    """A free folder name next to `run_dir`, for a new run: RUN-2, RUN-3, ..."""
    n = 2
    while run_dir.with_name(f"{run_dir.name}-{n}").exists():
        n += 1
    return str(run_dir.with_name(f"{run_dir.name}-{n}"))


def refuse_breaking_changes(run_dir: Path, path: Path, meta: dict[str, Any], cfg: Config) -> None:
    broken = breaking_changes(meta["config"], cfg.to_dict())
    broken += [c for c in stream_changes(meta["config"], cfg) if c not in broken]  # seq_len may be in both
    if broken:
        raise ConfigError(f"{path} cannot be resumed with this config: {'; '.join(broken)}. Restore these "
                          f"settings, or start a new run in its own folder (run.out_dir="
                          f"{_sibling(run_dir)})")


def optimizer_layout_changes(path: Path, meta: dict[str, Any], cfg: Config, world_size: int) -> list[str]:
    """What keeps the optimizer state of checkpoint `path` from loading into this run (empty: nothing). DeepSpeed
    cuts an MoE model's expert optimizer state per expert-parallel rank: another parallel.expert regroups it, and
    at parallel.expert > 1 under ZeRO 1-2 another world size re-partitions it over the expert-data-parallel ranks,
    which the universal conversion cannot do for MoE (ds_to_universal merges the ranks' local expert ids). At
    parallel.expert=1 (ZeRO shards cut as a dense model's) or ZeRO-0 (whole state per expert-parallel rank) a
    world-size change keeps the optimizer state."""
    old = meta["config"]
    if not old["model"].get("moe", {}).get("num_experts"):
        return []
    old_ep, new_ep, old_world = old.get("parallel", {}).get("expert", 1), cfg.parallel.expert, meta["world_size"]
    changes = [f"parallel.expert: {old_ep} -> {new_ep}"] if old_ep != new_ep else []
    if old_world != world_size and (changes or (old_ep > 1 and reshard.is_zero_checkpoint(path))):
        changes.append(f"world size: {old_world} -> {world_size} processes")
    return changes


def weights_only_changes(run_dir: Path, path: Path, meta: dict[str, Any], cfg: Config, world_size: int
                         ) -> list[str]:
    """`optimizer_layout_changes`, refused unless checkpoint.resume_weights_only accepts a weights-only resume."""
    changes = optimizer_layout_changes(path, meta, cfg, world_size)
    if changes and not cfg.checkpoint.resume_weights_only:
        old_ep = meta["config"].get("parallel", {}).get("expert", 1)
        raise ConfigError(f"{path} cannot be resumed with its optimizer state: {'; '.join(changes)} (DeepSpeed cuts "
                          f"the experts' optimizer state per expert-parallel rank and cannot re-cut it). Restore "
                          f"parallel.expert={old_ep} on {meta['world_size']} processes, start a new run in its own "
                          f"folder (run.out_dir={_sibling(run_dir)}), or pass --resume-weights-only "
                          f"(checkpoint.resume_weights_only=true) to load the weights (experts re-split), step, data "
                          f"position and lr schedule and start the optimizer state fresh", ("parallel.expert",))
    return changes


def check_before_launch(run_dir: Path, cfg: Config, resume: str, world_size: int) -> str | None:
    """What a resume on `world_size` processes would do, decided from the files alone before any process group
    starts, so that a refusal leaves the run folder as it was. Refuses a missing `--resume` folder, a config that
    breaks the checkpoint, an MoE layout its optimizer state cannot follow (unless weights only), and a
    `train.max_steps` the run has already passed. Returns a message when the run is finished (its summary is
    written at that step): re-running it is then a no-op."""
    path = resume_target(run_dir, resume)
    if path is None:
        return None
    meta = read_client_state(path)
    step, max_steps = meta["train_state"]["step"], cfg.train.max_steps
    if step > max_steps:
        raise ConfigError(f"train.max_steps={max_steps} is below step {step} of {path}: this run is past it, "
                          f"and nothing was changed. To train a new {max_steps}-step run, give it its own "
                          f"folder (run.out_dir={_sibling(run_dir)}); to continue this one, set "
                          f"train.max_steps above {step}", ("train.max_steps",))
    refuse_breaking_changes(run_dir, path, meta, cfg)
    weights_only_changes(run_dir, path, meta, cfg, world_size)
    summary = _read_summary(run_dir)
    if step == max_steps and summary.get("final_step") == step and _is_latest(run_dir, path):
        val_loss = summary.get("val_loss")
        shown = "None" if val_loss is None else f"{val_loss:.4f}"
        return (f"{run_dir} is finished: step {step} of train.max_steps={max_steps}, val_loss {shown} "
                f"(summary.json); nothing to do, nothing changed. To train longer, raise train.max_steps; for a "
                f"new run, give it its own folder (run.out_dir={_sibling(run_dir)})")
    return None


def _is_latest(run_dir: Path, path: Path) -> bool:
    try:
        latest = read_latest(run_dir / "checkpoints")
    except FileNotFoundError:
        return False
    return latest is not None and latest.resolve() == path.resolve()


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def check_quietly(path: Path, verify: VerifyMode) -> str | None:
    problem = verify_checkpoint(path, verify)
    return None if problem is None else str(problem)


def newest_verified(checkpoint_dir: Path, verify: VerifyMode, before_step: int | None
                    ) -> tuple[Path | None, list[dict[str, Any]], str | None]:
    """Rank 0: `latest` if it verifies, else the newest `step_*` that does (`latest` is pointed at it); with
    `before_step`, the newest verified checkpoint of a step below it instead. Only `step_NNNNNNNN` folders inside
    `checkpoint_dir` are candidates: a `latest` holding anything else (empty, a path) is a broken pointer, said so
    and skipped. Corrupt candidates are moved to corrupt/. Returns (the checkpoint or None, one event per broken
    pointer or move, a refusal when checkpoints existed but none verifies)."""
    if not checkpoint_dir.exists():
        return None, [], None
    latest_name = read_latest_name(checkpoint_dir)
    steps = step_folders(checkpoint_dir)[::-1]  # newest first
    events: list[dict[str, Any]] = []
    if before_step is not None:
        candidates = [p for p in steps if step_of(p) < before_step]
    elif latest_name is None:
        return None, [], None
    elif is_step_name(latest_name):  # what `latest` names first (even a missing folder: a half-synced copy)
        candidates = [checkpoint_dir / latest_name, *(p for p in steps if p.name < latest_name)]
    else:
        events.append(_skip_broken_latest(checkpoint_dir, latest_name))
        candidates = steps
    for path in candidates:
        problem = verify_checkpoint(path, verify)
        if problem is None:
            if before_step is None and path.name != latest_name:
                write_text_atomic(checkpoint_dir / LATEST, path.name + "\n")
            return path, events, None
        moved = quarantine(path, problem)
        events.append({"event": "corrupt_checkpoint", "checkpoint": path.name, "file": str(problem.file),
                       "reason": problem.reason, "moved_to": str(moved)})
    if before_step is not None:
        return None, events, None
    if not candidates:
        return None, events, (f"{broken_latest(checkpoint_dir, latest_name)}, and there is no checkpoint folder "
                              f"to resume from instead: delete {checkpoint_dir / LATEST} to start this run over, or "
                              f"restore its checkpoints")
    return None, events, (f"no checkpoint in {checkpoint_dir} verifies (corrupt ones were moved to "
                          f"{checkpoint_dir / CORRUPT_DIR}); copy good checkpoints back, or start a new run "
                          f"in another run.out_dir")


def _skip_broken_latest(checkpoint_dir: Path, text: str) -> dict[str, Any]:
    """Say loudly that `latest` is ignored (it is rewritten once a checkpoint verifies); the event to log."""
    print(f"warning: {broken_latest(checkpoint_dir, text)}; ignored (nothing it names is read, moved or "
          f"deleted), resuming from the newest checkpoint folder that verifies", file=sys.stderr, flush=True)
    return {"event": "broken_latest", "latest": text[:200]}


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
    later = [p for p in step_folders(checkpoint_dir) if step_of(p) > start_step]
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
        write_text_atomic(checkpoint_dir / LATEST, start.name + "\n")
    else:
        (checkpoint_dir / LATEST).unlink(missing_ok=True)
    print(f"resuming from step {start_step}: moved later checkpoints to {aside}: "
          f"{', '.join(p.name for p in moved)}", flush=True)
    return moved


def refuse_unsafe_files(path: Path, place: ProcessPlace, trust: bool) -> None:
    """Rank 0 scans the checkpoint's pickles (nothing is run); every rank then refuses the same files, before
    any of them reads one, so no rank is left waiting for another that refused. The reads themselves are
    weights_only loads as well (`Checkpointer.load`): this scan only makes the refusal early and collective."""
    problems = all_gather_objects(Rank0(place).run(safe_load.unsafe_files, safe_load.checkpoint_files(path)))[0]
    safe_load.refuse_or_trust(problems, trust, report=place.is_rank0, every_rank=True)


def plan_resume(run_dir: Path, cfg: Config, place: ProcessPlace, resume: str) -> ResumePlan | None:
    """Find the checkpoint to resume, refuse an incompatible config, and (rank 0, the others wait) convert a
    ZeRO checkpoint of another world size to the universal format. Runs before the engine is built, because
    a universal load must be switched on in the DeepSpeed config."""
    events: list[dict[str, Any]] = []
    path = find_checkpoint(run_dir, resume, place, cfg.checkpoint.verify, events)
    if path is None:
        return None
    refuse_unsafe_files(path, place, cfg.checkpoint.trust)
    meta = read_client_state(path)
    refuse_breaking_changes(run_dir, path, meta, cfg)
    weights_only = weights_only_changes(run_dir, path, meta, cfg, place.world_size)
    world_changed = meta["world_size"] != place.world_size
    parallel = cfg.parallel.tensor * cfg.parallel.sequence
    if world_changed and parallel > 1:
        raise ConfigError(f"{path} was saved by {meta['world_size']} processes and this run has {place.world_size}: "
                          f"with parallel.tensor={cfg.parallel.tensor} and parallel.sequence="
                          f"{cfg.parallel.sequence} a resume must keep the world size (re-sharding tensor- or "
                          f"sequence-parallel checkpoints is not supported here); launch {meta['world_size']} "
                          f"processes, or start a new run (another run.out_dir, or --resume none)")
    universal = world_changed and not weights_only and reshard.is_zero_checkpoint(path)
    if universal:
        Rank0(place).run_while_others_wait(reshard.convert_to_universal, path, cfg.checkpoint.trust)
    if weights_only:
        events.append(warn_weights_only(path, meta, weights_only, place))
    return ResumePlan(path=path, meta=meta, changes=allowed_changes(meta["config"], cfg.to_dict()),
                      world_changed=world_changed, universal=universal,
                      global_batch=(global_batch(meta["config"], meta["world_size"]),
                                    global_batch(cfg.to_dict(), place.world_size)), events=events,
                      weights_only=weights_only)


def warn_weights_only(path: Path, meta: dict[str, Any], changes: list[str], place: ProcessPlace) -> dict[str, Any]:
    """Say loudly (rank 0) that the optimizer state is dropped; the event to log."""
    Rank0(place).run(print, f"warning: WEIGHTS-ONLY RESUME of {path} ({'; '.join(changes)}; "
                            f"checkpoint.resume_weights_only): the weights (experts re-split), step "
                            f"{meta['train_state']['step']}, data position and lr schedule are loaded, the OPTIMIZER "
                            f"STATE IS RESET (Adam's moments start from zero): expect the loss to wobble for a few "
                            f"steps", file=sys.stderr, flush=True)
    return {"event": "weights_only_resume", "checkpoint": path.name, "changes": changes}
