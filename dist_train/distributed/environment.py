"""Where this process sits in the job, read from the launcher's environment in one place.

Launchers disagree on how they say it: `deepspeed` and `torchrun` export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*,
`srun` exports SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, and a plain `python launch/train.py` exports nothing.
`discover()` turns all three into one `ProcessPlace` and exports the torch names, so `deepspeed.init_distributed`
never falls back to MPI discovery (which fails without mpi4py).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessPlace:
    rank: int
    local_rank: int
    world_size: int
    host: str
    slurm_node: str | None
    slurm_job_id: str | None
    slurm_restart_count: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(env: dict[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def discover(env: dict[str, str] | None = None) -> ProcessPlace:
    """Read rank and world size from torch/DeepSpeed variables, else SLURM's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env:
        rank = _env_int(env, "RANK", default=0)
        local_rank = _env_int(env, "LOCAL_RANK", default=0)
        world = _env_int(env, "WORLD_SIZE", default=1)
    else:
        rank = _env_int(env, "SLURM_PROCID", default=0)
        local_rank = _env_int(env, "SLURM_LOCALID", default=0)
        world = _env_int(env, "SLURM_NTASKS", default=1)
    return ProcessPlace(
        rank=rank, local_rank=local_rank, world_size=world, host=socket.gethostname(),
        slurm_node=env.get("SLURMD_NODENAME"), slurm_job_id=env.get("SLURM_JOB_ID"),
        slurm_restart_count=_env_int(env, "SLURM_RESTART_COUNT", default=0),
    )


def export_torch_env(place: ProcessPlace) -> None:
    """Export the variables torch.distributed's env:// rendezvous reads (defaults for a single process)."""
    os.environ["RANK"] = str(place.rank)
    os.environ["LOCAL_RANK"] = str(place.local_rank)
    os.environ["WORLD_SIZE"] = str(place.world_size)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if place.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set: launch with deepspeed, torchrun or srun via "
                               "`python -m launch.slurm`, or export MASTER_ADDR and MASTER_PORT")
        os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
