"""Where this process sits in the job, read from the launcher's environment in one place.

Launchers disagree on how they say it: `deepspeed` and `torchrun` export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*,
`srun` exports SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS, and a plain `python launch/train.py` exports
nothing (inside an sbatch script it sees the job's SLURM variables, but no step's).
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
    """Read rank and world size from torch/DeepSpeed variables, else from SLURM's when this process is a task
    of an srun step, else a single process.

    The batch script of an sbatch job (and an salloc shell) also carries SLURM_NTASKS and SLURM_PROCID=0, but a
    plain `python launch/train.py` there is one process, not SLURM_NTASKS of them: it would wait for ranks
    that never come. Only srun's tasks have SLURM_STEP_ID, and SLURM_STEP_NUM_TASKS counts the step's tasks
    (`srun --ntasks=1` inside a 2-task job is one process)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        rank = _env_int(env, "RANK", default=0)
        local_rank = _env_int(env, "LOCAL_RANK", default=0)
        world = _env_int(env, "WORLD_SIZE", default=1)
    elif env.get("SLURM_STEP_ID", "") != "":
        rank = _env_int(env, "SLURM_PROCID", default=0)
        local_rank = _env_int(env, "SLURM_LOCALID", default=0)
        world = _env_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    else:
        rank, local_rank, world = 0, 0, 1
    return ProcessPlace(
        rank=rank, local_rank=local_rank, world_size=world, host=socket.gethostname(),
        slurm_node=env.get("SLURMD_NODENAME"), slurm_job_id=env.get("SLURM_JOB_ID"),
        slurm_restart_count=_env_int(env, "SLURM_RESTART_COUNT", default=0),
    )


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU of this process among those it sees. Sites that bind one GPU per task (`--gpus-per-task=1`,
    `--gpu-bind=single:1`) show every process only its own GPU, as device 0, while the local rank still counts
    the node's processes: local_rank % visible devices is right in both cases."""
    return local_rank % visible_devices


def export_torch_env(place: ProcessPlace, cuda_devices: int | None = None) -> None:
    """Export the variables torch.distributed's env:// rendezvous reads (defaults for a single process).

    With `cuda_devices` (the GPUs this process sees), LOCAL_RANK is exported as this process's GPU index:
    DeepSpeed takes LOCAL_RANK for the device in `init_process_group(device_id=...)` and in the engine's
    `set_device`, which fail where one GPU is bound per task. `place.local_rank` keeps the node-local rank."""
    os.environ["RANK"] = str(place.rank)
    local = place.local_rank if cuda_devices is None else cuda_device_index(place.local_rank, cuda_devices)
    os.environ["LOCAL_RANK"] = str(local)
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
