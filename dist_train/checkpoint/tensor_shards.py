"""Whole fp32 weights from a tensor-parallel (DeepSpeed AutoTP) checkpoint.

AutoTP rank t writes `mp_rank_{t:02}_model_states.pt` and, at ZeRO 1-2,
`zero_pp_rank_{d}_mp_rank_{t:02}_optim_states.pt` for each data-parallel rank d: its own ZeRO checkpoint of its
shards. DeepSpeed's `zero_to_fp32` reads one
model-parallel rank's files only, so each rank's files are shown to it alone (symbolic links in a temporary
folder named as a rank-0 checkpoint), and the shards are joined along the dimension in which they differ from
the whole parameter's shape (the model built on the meta device): AutoTP cuts whole rows (column-parallel
layers) or whole columns (row-parallel layers) in rank order. Replicated tensors are read from rank 0.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_train.config import Config

_MP_RANK = re.compile(r"mp_rank_(\d+)")


def tensor_parallel_ranks(path: Path) -> int:
    """Model-parallel ranks that wrote checkpoint folder `path` (1 unless tensor-parallel)."""
    return len(list(path.glob("mp_rank_*_model_states.pt")))


def _rank_view(path: Path, rank: int, root: Path) -> Path:
    """A folder `root/<tag>` that holds tensor-parallel rank `rank`'s files under rank 0's names."""
    view = root / path.name
    view.mkdir(parents=True)
    for f in path.glob(f"*mp_rank_{rank:02d}_*.pt"):
        (view / _MP_RANK.sub("mp_rank_00", f.name)).symlink_to(f.resolve())
    return view


def _rank_state(view: Path) -> dict[str, Any]:
    if not list(view.glob("*_optim_states.pt")):  # ZeRO-0: the module state is the rank's whole shard
        return torch.load(view / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(view.parent), tag=view.name)


def full_shapes(cfg: Config) -> dict[str, torch.Size]:
    """Every tensor's unsharded shape, from the model built on the meta device (no memory)."""
    from dist_train.model.build import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    return {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}


def join_shards(shards: list[torch.Tensor], shape: torch.Size, name: str) -> torch.Tensor:
    """Concatenate tensor-parallel shards along the one dimension they cut (or return the replicated one)."""
    if shards[0].shape == shape:
        return shards[0]
    cut = [d for d, (a, b) in enumerate(zip(shards[0].shape, shape)) if a != b]
    joined = torch.cat(shards, dim=cut[0]) if len(cut) == 1 else None
    if joined is None or joined.shape != shape:
        raise ValueError(f"cannot join the {len(shards)} tensor-parallel shards of {name} "
                         f"({tuple(shards[0].shape)} each) into its shape {tuple(shape)}")
    return joined


def tensor_parallel_state(path: Path, cfg: Config) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """(names, getter) of the whole fp32 tensors of tensor-parallel checkpoint folder `path`; every file is read
    here, not by the getter (the caller guards the reads: `dist_train.checkpoint.safe_load`)."""
    root = Path(tempfile.mkdtemp(prefix="tp_shards_"))
    try:
        states = [_rank_state(_rank_view(path, rank, root / f"rank{rank}"))
                  for rank in range(tensor_parallel_ranks(path))]
    finally:  # the states are in memory now
        shutil.rmtree(root, ignore_errors=True)
    shapes = full_shapes(cfg)
    return list(states[0]), lambda name: join_shards([s[name] for s in states], shapes[name], name)
