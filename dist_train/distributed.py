"""Where this process sits in the job, read from the launcher's environment in one place.

Launchers disagree on how they say it: `deepspeed` and `torchrun` export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*,
`srun` exports SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, and a plain `python launch/train.py` exports nothing.
`discover()` turns all three into one `ProcessPlace` and exports the torch names, so `deepspeed.init_distributed`
never falls back to MPI discovery (which fails without mpi4py).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def use_cuda() -> bool:
    """GPUs are used when CUDA is present, unless DeepSpeed was told to run on the CPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def prepare_accelerator() -> None:
    """Point DeepSpeed at the CPU (gloo) when there is no GPU; must run before deepspeed is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed() -> ModuleType:
    """Import DeepSpeed for this machine: its accelerator is chosen at import time, and its logger, created then
    too, is pointed at stderr so that stdout carries only our own output (`--json` stays parseable)."""
    prepare_accelerator()
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
    return deepspeed


def gathered_for_init(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full tensors of ZeRO-3-partitioned parameters while a module initialises them (every rank runs the init,
    so RNG streams stay in step; rank 0's values are kept and scattered); a no-op for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
"""How long a collective of the training loop waits for the slowest rank before the job fails."""
RANK0_WORK_TIMEOUT = datetime.timedelta(hours=6)
"""How long the other ranks wait for rank 0's file work (a universal conversion of a large model can take
longer than COLLECTIVE_TIMEOUT)."""
_rank0_work_group: Any = None


def init(place: ProcessPlace, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> torch.device:
    """Start the process group (NCCL on CUDA, gloo on CPU) and return this process's device."""
    deepspeed = import_deepspeed()
    export_torch_env(place)
    if use_cuda():
        torch.cuda.set_device(place.local_rank)
        device = torch.device("cuda", place.local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", timeout=timeout)
    return device


def shutdown() -> None:
    """A barrier then destroy: without it some gloo runs abort at exit (code 250)."""
    global _rank0_work_group
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _rank0_work_group = None


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _wait_for_rank0_group() -> Any:
    """A gloo group with RANK0_WORK_TIMEOUT, made once, by every rank at the same call."""
    global _rank0_work_group
    if _rank0_work_group is None and dist.is_available() and dist.is_initialized():
        _rank0_work_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
    return _rank0_work_group


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a small tensor over all ranks (returned on the CPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = values.to(_collective_device())
    dist.all_reduce(t)
    return t.cpu()


def mean_over_ranks(value: float) -> float:
    return sum_over_ranks(torch.tensor([value], dtype=torch.float64)).item() / world_size()


class Rank0:
    """The one gate for side effects that only rank 0 performs (printing, files, W&B)."""

    def __init__(self, place: ProcessPlace):
        self.active = place.is_rank0

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if self.active else None

    def run_while_others_wait(self, fn: Callable[..., Any], *args: Any) -> None:
        """Rank 0 runs `fn` (shared files: rename, delete, convert) while the other ranks wait for it; an
        error on rank 0 is raised on every rank, so that none of them waits forever for a rank that died."""
        group = _wait_for_rank0_group()  # before the work: every rank joins it at the same moment
        error = None
        if self.active:
            try:
                fn(*args)
            except (OSError, RuntimeError) as e:
                error = str(e)
        errors = [e for e in all_gather_objects(error, group) if e]
        if errors:
            raise RuntimeError(errors[0])

    def print(self, *args: Any) -> None:
        if self.active:
            print(*args, flush=True)
