"""The GPUs the deepspeed launcher starts this machine's processes on: `python -m launch.devices N` prints its
device arguments, one per line (exit 2, with the reason, when CUDA_VISIBLE_DEVICES cannot give N GPUs).

Given `--num_gpus N`, deepspeed's launcher drops CUDA_VISIBLE_DEVICES (it prints that it is "ignoring it") and
starts the processes on GPUs 0..N-1, which on a shared machine may be someone else's. So where the variable
names GPUs, the first N of them are passed as `--include localhost:ID,...`, which is what the launcher does with
the variable itself when it is run without `--num_gpus`.
"""

from __future__ import annotations

import os
import sys


class DeviceError(ValueError):
    """CUDA_VISIBLE_DEVICES cannot give the processes asked for."""


def deepspeed_device_args(nproc: int, visible: str | None, cuda: bool) -> list[str]:
    """The deepspeed launcher's arguments for `nproc` processes on this machine; `visible` is
    CUDA_VISIBLE_DEVICES (None when unset), `cuda` whether the processes run on GPUs."""
    if not cuda or visible is None or not visible.strip():
        return ["--num_gpus", str(nproc)]  # CPU processes, or every GPU of the machine
    ids = [x.strip() for x in visible.split(",") if x.strip()]
    if not all(x.isdigit() for x in ids):
        raise DeviceError(f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID or MIG name, and deepspeed's launcher "
                          f"takes indices (it would train on GPUs 0..{nproc - 1}): set it to indices "
                          f"(`nvidia-smi -L` lists them)")
    if nproc > len(ids):
        raise DeviceError(f"{nproc} processes asked for, but CUDA_VISIBLE_DEVICES={visible} names {len(ids)} GPU(s): "
                          f"ask for at most {len(ids)}, or name more GPUs")
    return ["--include", f"localhost:{','.join(ids[:nproc])}"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
        print(f"usage: python -m launch.devices N (a number of processes >= 1), got {' '.join(args)!r}",
              file=sys.stderr)
        return 2
    import torch

    try:
        print("\n".join(deepspeed_device_args(int(args[0]), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                              torch.cuda.is_available())))
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
