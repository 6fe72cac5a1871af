"""The run folder must be one folder for every process: each rank writes its own part of every checkpoint
there and rank 0 publishes the whole. On node-local disks a multi-node run would publish checkpoints that
lack the other nodes' parts, and resume from them would fail much later. So every start checks it: rank 0
writes a file with a fresh nonce, and after a barrier every rank must read that nonce back.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import torch.distributed as dist

from dist_train.config import ConfigError
from dist_train.distributed.collectives import all_gather_objects
from dist_train.distributed.environment import ProcessPlace


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_shared_run_dir(run_dir: Path, place: ProcessPlace) -> None:
    """Refuse (ConfigError, on every rank) a run folder that some rank does not share with rank 0. A
    collective: every rank calls it with its own view of `run.out_dir`."""
    if place.world_size == 1:
        return
    nonce = secrets.token_hex(8) if place.is_rank0 else None
    nonce = all_gather_objects(nonce)[0]
    probe = Path(run_dir) / f".shared_check_{nonce}"
    if place.is_rank0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(nonce)
    _barrier()
    try:
        seen = probe.read_text() == nonce
    except OSError:
        seen = False
    views = all_gather_objects((seen, place.rank, place.host, place.slurm_node))
    _barrier()  # every rank has looked before the probe goes
    if place.is_rank0:
        probe.unlink()
    blind = [f"rank {rank} (host {host}{f', node {node}' if node else ''})" for ok, rank, host, node in views
             if not ok]
    if blind:
        raise ConfigError(
            f"run.out_dir {run_dir} is not one folder shared by all processes: rank 0 wrote {probe.name} there, "
            f"but {', '.join(blind)} cannot read it. Every rank writes its part of each checkpoint into this "
            f"folder, so checkpoints would be incomplete. Put run.out_dir on a filesystem that every node "
            f"mounts at the same path (NFS, Lustre, GPFS, ...).")
