"""Resume a checkpoint on another number of processes, optimizer state included.

    python -m dist_train.checkpoint.reshard --checkpoint RUN/checkpoints/step_N   (optional: the trainer does it)

A ZeRO 1-3 checkpoint holds each rank's slice of the flat fp32 weights and Adam moments, cut for the world
size that wrote it, and DeepSpeed refuses to load it into another. DeepSpeed's universal checkpoint format
stores every parameter whole instead (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), and an engine started with
`"checkpoint": {"load_universal": true}` slices it for its own world size. We convert once, into
`step_N/universal/` (written to a temporary folder and renamed, so a kill leaves no half cache), and reuse
it for every later resume. ZeRO stage 0 checkpoints hold whole tensors already and load at any world size.

The ZeRO stage cannot change across a resume (converting between stage 2 and 3 fails in DeepSpeed), and
after a universal load into ZeRO-3 two DeepSpeed 0.19 defects are repaired (`repair_zero3_optimizer`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint import safe_load
from dist_train.checkpoint.layout import CLIENT_STATE, tag_for
from dist_train.distributed.process_group import deepspeed_logs_to_stderr

UNIVERSAL_TAG = "universal"


def is_zero_checkpoint(path: Path) -> bool:
    """ZeRO 1-3 checkpoints have per-rank optimizer shards (`[bf16_]zero_pp_rank_*`); stage 0 keeps the optimizer
    whole (an MoE model's in one `expp_rank_*_optim_states.pt` per expert-parallel rank, which any world size of
    the same parallel.expert loads as it is)."""
    return any(path.glob("*zero_pp_rank_*_optim_states.pt"))


def universal_path(path: Path) -> Path:
    return path / UNIVERSAL_TAG


MAX_EXTRACT_WORKERS = 16
"""ds_to_universal extract processes at most: each holds one saved rank's optimizer shard (12 bytes x Ψ/N)."""
MAX_MERGE_WORKERS = 8
"""Merge processes at most: each holds every rank's slice of one parameter (its fp32 weights and Adam moments)."""


def conversion_workers(cpus: int, rank_files: int) -> tuple[int, int]:
    """(extract, merge) worker processes for ds_to_universal. The conversion runs at start-up, while the other
    ranks only wait for it, so it may use every CPU this process is allowed on: one extract worker per saved
    rank file (that is the work it splits), merge workers for the rest, each within its memory cap."""
    extract = max(1, min(cpus, rank_files, MAX_EXTRACT_WORKERS))
    merge = max(1, min(cpus, MAX_MERGE_WORKERS))
    return extract, merge


def convert_to_universal(path: Path, trust: bool = False) -> Path:
    """Convert checkpoint folder `path` to `path/universal` (cached); return that folder. DeepSpeed's converter
    runs under `dist_train.checkpoint.safe_load`: its reads are weights_only loads (pickle only with `trust`);
    its worker processes are forked, so they inherit that."""
    out = universal_path(path)
    if (out / "zero").is_dir():
        return out
    work = path / ".universal_tmp"
    shutil.rmtree(work, ignore_errors=True)
    extract, merge = conversion_workers(len(os.sched_getaffinity(0)), len(list(path.glob("*_optim_states.pt"))))
    # --inject_missing_state supplies metadata that client-optimizer checkpoints lack.
    cmd = [sys.executable, "-m", "dist_train.checkpoint.safe_load", *(["--trust-checkpoint"] if trust else []),
           "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(work / UNIVERSAL_TAG), "--inject_missing_state",
           "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"converting {path} to a universal checkpoint failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    os.rename(work / UNIVERSAL_TAG, out)
    shutil.rmtree(work)
    return out


def group_hyperparameters(engine: Any) -> list[dict[str, Any]]:
    """Per-group settings of the client optimizer that a ZeRO-3 universal load overwrites."""
    return [{"weight_decay": g["weight_decay"]} for g in _base_optimizer(engine).param_groups]


def repair_zero3_optimizer(engine: Any, hyperparameters: list[dict[str, Any]]) -> None:
    """Undo two defects of DeepSpeed 0.19's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_...):
    - it copies param group 0's settings into every group, so the no-decay group (norms, embeddings) would
      be decayed: restore each group's weight_decay;
    - it gives every sub-group's Adam state the *same* `step` tensor, which torch's AdamW increments in place
      once per group per step, so bias correction would run ahead: give each state its own copy.
    Each was seen as a ~1e-3 loss divergence on the first resumed steps; with the repair the resumed losses
    equal the uninterrupted ones (tests/test_resume_world_size.py)."""
    optimizer = _base_optimizer(engine)
    for group, saved in zip(optimizer.param_groups, hyperparameters):
        group.update(saved)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def place_loaded_steps(engine: Any) -> None:
    """Put each Adam `step` where torch's own `Optimizer.load_state_dict` would: on its parameter's device, as
    fp32, in a fused or capturable group (a fused CUDA AdamW reads it on the GPU), and where it is in any other
    (torch keeps it on the CPU there). DeepSpeed's universal load assigns the tensor it read from step.pt, which
    ds_to_universal wrote from a CPU copy (`map_location="cpu"`), at every ZeRO stage."""
    optimizer = _base_optimizer(engine)
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _steps_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step_*") if p.is_dir()) if folder.is_dir() else []


def _existing_checkpoint(path: Path) -> Path | None:
    """`path`, or `step_00000200` for a `step_200` that does not exist; None (with the reason on stderr) when
    there is no such folder or it is no checkpoint (a published one always holds client_state.json): a folder
    without ZeRO files is a stage-0 checkpoint only when it is a checkpoint at all."""
    if not path.is_dir() and path.name.startswith("step_") and path.name[5:].isdigit():
        padded = path.with_name(tag_for(int(path.name[5:])))
        path = padded if padded.is_dir() else path
    if (path / CLIENT_STATE).is_file():
        return path
    if not path.is_dir():
        here = _steps_in(path.parent)
        reason = "does not exist" + (f"; {path.parent} has {', '.join(here)}" if here else "")
    else:
        checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        here = _steps_in(checkpoints)
        reason = (f"is no checkpoint folder (it has no {CLIENT_STATE}, which every published checkpoint holds)"
                  + (f"; pass one of {checkpoints}/{{{', '.join(here)}}}" if here else ""))
    print(f"reshard: --checkpoint {path} {reason}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_train.checkpoint.reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder RUN/checkpoints/step_N")
    safe_load.add_trust_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    args.checkpoint = _existing_checkpoint(args.checkpoint)
    if args.checkpoint is None:
        return 2
    deepspeed_logs_to_stderr()
    # DeepSpeed logs to stdout (on import too), which carries --json: its lines go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            safe_load.check_folder(args.checkpoint, args.trust_checkpoint)
        except safe_load.UnsafeCheckpointError as e:
            print(f"reshard: {e}", file=sys.stderr)
            return 2
        if not is_zero_checkpoint(args.checkpoint):
            result = {"checkpoint": str(args.checkpoint), "universal": None,
                      "note": "not a ZeRO 1-3 checkpoint: stage 0 loads at any world size as it is"}
        else:
            universal = convert_to_universal(args.checkpoint, args.trust_checkpoint)
            result = {"checkpoint": str(args.checkpoint), "universal": str(universal)}
    if args.json:
        print(json.dumps(result))
    elif result["universal"] is None:
        print(f"{args.checkpoint}: {result['note']}")
    else:
        print(f"universal checkpoint: {result['universal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
