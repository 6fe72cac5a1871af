"""The process group (NCCL on CUDA, gloo on CPU), DeepSpeed's import, and the long-timeout group on which the
other ranks wait for rank 0's file work.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from dist_train.distributed.environment import ProcessPlace, cuda_device_index, export_torch_env


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
    export_torch_env(place, cuda_devices=torch.cuda.device_count() if use_cuda() else None)
    if use_cuda():
        device = torch.device("cuda", cuda_device_index(place.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", timeout=timeout)
    if not use_cuda():
        unlink_shm_workspace()
    return device


def shm_workspace_path(rank: int) -> Path:
    """The shared-memory file of DeepSpeed's CPU all-reduce for `rank` of this job (named as shm.cpp names it)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_workspace() -> None:
    """DeepSpeed's CPU backend, where every rank is on one node (LOCAL_SIZE = world size, as its launcher sets),
    gives each rank a 66 MiB file in /dev/shm and never removes it: every CPU run left 66 MiB per process of RAM
    behind until reboot (a day of tests here: 11 GiB). Once every rank has mapped every file (the barrier), the
    names can go; the memory lives while a process maps it and is freed when the last one exits, even by kill -9."""
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return  # DeepSpeed made no shared memory
    dist.barrier()
    shm_workspace_path(dist.get_rank()).unlink(missing_ok=True)


def configure_matmul_precision(device: torch.device, tf32: bool) -> None:
    """On CUDA, fp32 matmuls use TF32 tensor cores when `tf32` (config train.tf32), else full fp32. The
    process-wide setting torch.compile and cuBLAS read; the CPU is left alone (there "high" would switch oneDNN's
    fp32 matmuls to a reduced precision too)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def shutdown() -> None:
    """A barrier then destroy: without it some gloo runs abort at exit (code 250)."""
    global _rank0_work_group
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _rank0_work_group = None


def _wait_for_rank0_group() -> Any:
    """A gloo group with RANK0_WORK_TIMEOUT, made once, by every rank at the same call."""
    global _rank0_work_group
    if _rank0_work_group is None and dist.is_available() and dist.is_initialized():
        _rank0_work_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
    return _rank0_work_group


def deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout (its handler holds the stdout of import time, so redirecting
    `sys.stdout` later does not help), and a tool's stdout carries `--json`: point the handler at stderr."""
    with contextlib.redirect_stdout(sys.stderr):  # importing DeepSpeed logs its accelerator
        from deepspeed.utils import logger

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
