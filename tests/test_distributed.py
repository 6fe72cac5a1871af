"""Process-group helpers under real processes (gloo on the CPU)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from distributed_helpers import run_distributed

COLLECTIVE_TIMEOUT_S = 2.0


def _rank0_works_longer_than_the_collective_timeout(rank: int, world_size: int) -> float:
    from dist_train.distributed.environment import discover
    from dist_train.distributed.rank0 import Rank0

    start = time.monotonic()
    Rank0(discover()).run_while_others_wait(time.sleep, 3 * COLLECTIVE_TIMEOUT_S)  # e.g. a universal conversion
    return time.monotonic() - start


@pytest.mark.slow
def test_other_ranks_wait_for_rank0_work_longer_than_the_collective_timeout() -> None:
    """The process group's collectives time out after 2 s here; rank 0's file work takes 6 s, and rank 1 waits
    for it instead of failing (a universal conversion of a large model outlasts the 30-minute timeout)."""
    waited0, waited1 = run_distributed(_rank0_works_longer_than_the_collective_timeout, 2,
                                       collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    print(f"rank 0 worked {waited0:.1f} s, rank 1 waited {waited1:.1f} s")
    assert waited1 >= 3 * COLLECTIVE_TIMEOUT_S - 0.5


def _check_run_dir(rank: int, world_size: int, folders: list[str]) -> str:
    from dist_train.checkpoint.shared_folder import check_shared_run_dir
    from dist_train.config import ConfigError
    from dist_train.distributed.environment import discover

    try:
        check_shared_run_dir(Path(folders[rank]), discover())
    except ConfigError as e:
        return str(e)
    return "ok"


@pytest.mark.slow
def test_a_run_folder_that_is_not_shared_by_all_ranks_is_refused_on_every_rank(tmp_path) -> None:
    """Rank 1 sees another folder than rank 0, as a node-local disk would show it: both ranks refuse."""
    shared = [str(tmp_path / "shared")] * 2
    local = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    assert run_distributed(_check_run_dir, 2, shared) == ["ok", "ok"]
    assert not list((tmp_path / "shared").iterdir()), "the probe file is removed"
    refused = run_distributed(_check_run_dir, 2, local)
    print(refused[0])
    for folder, message in zip(local, refused, strict=True):  # each rank names the folder it sees
        assert f"run.out_dir {folder} is not one folder shared by all processes" in message
        assert "rank 1 (host" in message and "rank 0 (host" not in message
        assert "mounts at the same path" in message


# SLURM variables as slurmd 22.05 sets them in a job with --ntasks=2 (read from the test cluster's jobs).
SBATCH_SHELL = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURMD_NODENAME": "node1"}
SRUN_TASK_1 = {**SBATCH_SHELL, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
               "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
SRUN_ONE_TASK = {**SBATCH_SHELL, "SLURM_NTASKS": "1", "SLURM_NPROCS": "1", "SLURM_STEP_ID": "1",
                 "SLURM_STEP_NUM_TASKS": "1"}


@pytest.mark.parametrize(("env", "place"), [
    (SBATCH_SHELL, (0, 0, 1)),  # plain python in the batch script: one process, whatever --ntasks says
    (SRUN_TASK_1, (1, 1, 2)),  # a task of `srun` over the job's two tasks
    (SRUN_ONE_TASK, (0, 0, 1)),  # `srun --ntasks=1 python ...` inside the job
    ({**SRUN_TASK_1, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, (3, 1, 4)),  # torchrun under srun
    ({}, (0, 0, 1)),
], ids=["sbatch-shell", "srun-task", "srun-one-task", "torchrun-in-srun", "no-launcher"])
def test_rank_and_world_size_come_from_an_srun_step_never_from_the_batch_shell(env, place):
    from dist_train.distributed.environment import discover

    p = discover(env)
    assert (p.rank, p.local_rank, p.world_size) == place
    assert p.slurm_job_id == env.get("SLURM_JOB_ID")


def test_each_process_takes_its_own_gpu_also_where_one_gpu_is_bound_per_task(monkeypatch):
    """8 processes on a node: with all 8 GPUs visible, local rank 5 uses GPU 5; where SLURM binds one GPU per
    task, each process sees one GPU (device 0) and DeepSpeed, which takes LOCAL_RANK as the device, is told 0."""
    from dist_train.distributed.environment import ProcessPlace, cuda_device_index, export_torch_env

    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))
    assert [cuda_device_index(r, 1) for r in range(8)] == [0] * 8
    assert cuda_device_index(5, 4) == 1  # two GPUs per task: its second process of the pair
    place = ProcessPlace(rank=13, local_rank=5, world_size=16, host="h", slurm_node="n2", slurm_job_id="7",
                         slurm_restart_count=0)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        # setenv first, so monkeypatch restores each name as it was (a bare delenv of an absent name records
        # nothing, and RANK=13 WORLD_SIZE=16 leaked into every later `python launch/train.py` of the suite)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MASTER_PORT", "29500")
    export_torch_env(place, cuda_devices=1)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("13", "0", "16")
    export_torch_env(place, cuda_devices=8)
    assert os.environ["LOCAL_RANK"] == "5"
    export_torch_env(place)  # the CPU: the local rank as it is
    assert os.environ["LOCAL_RANK"] == "5"


def _shm_files_while_running(rank: int, world_size: int) -> tuple[list[bool], float]:
    import deepspeed.comm
    import torch

    from dist_train.distributed.process_group import shm_workspace_path

    deepspeed.comm.barrier()  # every rank is past its init
    left = [shm_workspace_path(r).exists() for r in range(world_size)]
    summed = torch.full((1024,), float(rank + 1))
    deepspeed.comm.inference_all_reduce(summed)  # the all-reduce that runs through those shared buffers
    return left, float(summed[0])


@pytest.mark.slow
def test_deepspeed_cpu_all_reduce_leaves_no_shared_memory_behind(monkeypatch) -> None:
    """Under DeepSpeed's launcher (LOCAL_SIZE = world size) its CPU backend maps a 66 MiB /dev/shm file per rank
    and never removes it; our init removes the names once every rank has mapped them, and the shared all-reduce
    still works."""
    monkeypatch.setenv("LOCAL_SIZE", "2")
    results = run_distributed(_shm_files_while_running, 2)
    assert results == [([False, False], 3.0)] * 2
