"""Real multi-process runs on the CPU: how multi-GPU logic is tested without GPUs.

- `run_distributed(fn, world_size, *args)` spawns `world_size` processes with a gloo process group (via the
  project's own `dist_train.distributed.init`) and runs `fn(rank, world_size, *args)` in each; it returns
  rank 0's result and fails the test if any rank fails.
- `launch_training(...)` runs `launch/train.py` under a real launcher (torchrun, deepspeed or plain python)
  as a subprocess and returns its completed process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CPU training process: DeepSpeed on gloo, the repo importable."""
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple, results: Any,
            timeout_s: float | None) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu",
                       "OMP_NUM_THREADS": "1"})
    import datetime

    from dist_train import distributed

    try:
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else distributed.COLLECTIVE_TIMEOUT
        distributed.init(distributed.discover(), timeout=timeout)
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report every failure to the parent test, whatever it is
        results[rank] = ("error", traceback.format_exc())
    finally:
        distributed.shutdown()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any,
                    collective_timeout_s: float | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` real processes; return every rank's result."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(fn, world_size, free_port(), args, results, collective_timeout_s),
                 nprocs=world_size, join=True)
        outcome = [results.get(r, ("error", "no result (the process died)")) for r in range(world_size)]
    errors = [f"rank {r}:\n{msg}" for r, (status, msg) in enumerate(outcome) if status != "ok"]
    assert not errors, "\n".join(errors)
    return [value for _, value in outcome]


def launch_training(config: str | Path, overrides: list[str], nproc: int = 2, launcher: str = "torchrun",
                    extra_env: dict[str, str] | None = None, timeout: float = 900,
                    args: list[str] | None = None) -> subprocess.CompletedProcess:
    """`launch/train.py` under a real launcher, as users run it; output captured for assertions. A free port
    can be taken by another process before the launcher binds it: that one failure is retried on a new port."""
    for _ in range(3):
        proc = _launch_once(config, overrides, nproc, launcher, extra_env, timeout, args)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            return proc
    return proc


def _launch_once(config: str | Path, overrides: list[str], nproc: int, launcher: str,
                 extra_env: dict[str, str] | None, timeout: float, args: list[str] | None
                 ) -> subprocess.CompletedProcess:
    script = [str(REPO / "launch" / "train.py"), "--config", str(config), *(args or []), *overrides]
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={port}", *script]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port}", *script]
    elif launcher == "python":
        assert nproc == 1, "plain python runs one process"
        cmd = [sys.executable, *script]
    else:
        raise ValueError(f"unknown launcher {launcher}")
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(extra_env), capture_output=True, text=True, timeout=timeout)
