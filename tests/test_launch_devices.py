"""The GPUs a local deepspeed launch uses: those CUDA_VISIBLE_DEVICES names (deepspeed's launcher drops the variable
when given --num_gpus and takes GPUs 0..N-1), checked against the launcher's own argument and filter parsing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from deepspeed.launcher.runner import parse_args, parse_inclusion_exclusion
from distributed_helpers import REPO

from launch.devices import DeviceError, deepspeed_device_args


def gpus_deepspeed_would_use(device_args: list[str], machine_gpus: int = 8) -> list[int]:
    """What deepspeed's runner makes of the arguments on one machine of `machine_gpus` GPUs."""
    args = parse_args([*device_args, "train.py"])
    if args.num_gpus >= 0:
        assert not args.include, "deepspeed refuses --num_gpus with --include"
        return list(range(args.num_gpus))
    return parse_inclusion_exclusion({"localhost": machine_gpus}, args.include, args.exclude)["localhost"]


def test_the_launch_uses_the_first_gpus_cuda_visible_devices_names():
    assert gpus_deepspeed_would_use(deepspeed_device_args(2, "4,5,6", cuda=True)) == [4, 5]
    assert gpus_deepspeed_would_use(deepspeed_device_args(3, " 6, 7 ,1", cuda=True)) == [1, 6, 7]  # sorted by it


def test_without_cuda_visible_devices_or_cuda_the_launch_takes_gpus_from_zero():
    assert gpus_deepspeed_would_use(deepspeed_device_args(2, None, cuda=True)) == [0, 1]
    assert gpus_deepspeed_would_use(deepspeed_device_args(2, "", cuda=True)) == [0, 1]
    assert deepspeed_device_args(2, "4,5", cuda=False) == ["--num_gpus", "2"]  # CPU processes: no GPU to pick


def test_more_processes_than_visible_gpus_or_gpus_named_by_uuid_are_refused():
    with pytest.raises(DeviceError, match=r"3 processes asked for, but CUDA_VISIBLE_DEVICES=4,5 names 2 GPU"):
        deepspeed_device_args(3, "4,5", cuda=True)
    with pytest.raises(DeviceError, match="by UUID or MIG name.*set it to indices"):
        deepspeed_device_args(1, "GPU-8a1b2c3d-0000-1111-2222-333344445555", cuda=True)


def test_the_module_prints_the_launchers_arguments_one_per_line():
    proc = subprocess.run([sys.executable, "-m", "launch.devices", "2"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "3,4"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["--num_gpus", "2"]  # this machine has no CUDA: CPU processes
