"""Shared by the SLURM tests: the command line under test, the tiny run's overrides, reading a run folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launch.slurm import job_status

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
NODES = ("node1", "node2")
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
                 "SUSPENDED", "SIGNALING", "STAGE_OUT"}


@dataclass(frozen=True)
class Cluster:
    """The running test cluster (see conftest.py): its state folder and slurm.conf."""

    state_dir: Path
    conf: Path

    def wait_for_end(self, job_id: str, log: Path, timeout_s: float = 240) -> dict[str, Any]:
        """Poll `scontrol show job -o` until the job ends; fail with the job's log if it takes too long."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = job_status(job_id)
            if status["state"] not in ACTIVE_STATES:
                return status
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], check=False)
                pytest.fail(f"job {job_id} did not end within {timeout_s:.0f} s (state {status['state']}, "
                            f"reason {status['reason']}); its log:\n{tail(log)}")
            time.sleep(1)


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def slurm_cli(*args: str, env: dict[str, str] | None = None, timeout: float | None = None
              ) -> subprocess.CompletedProcess:
    """`python -m launch.slurm ARGS` from the repository root, as a user types it."""
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)


def job_env() -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitter's environment): one thread per process, since
    the two simulated nodes share this machine's cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_run(shard_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a tiny run that logs every step (so the tests can follow it) and never evaluates."""
    return [f"data.path={shard_dir}", f"run.out_dir={run_dir}", "model.n_layers=2", "train.log_every=1",
            "train.eval_every=0", "train.warmup_steps=1", "precision=fp32", *extra]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: the trainer may be writing the last one."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def trained_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def latest_checkpoint_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    return int(latest.read_text().strip().removeprefix("step_"))


_STEP_LINE = re.compile(r"\bstep (\d+)/\d+ \| loss ")


def logged_steps(log: Path) -> list[int]:
    """Every step rank 0 trained, in order, over all starts of the job (the log is appended to on a requeue,
    while metrics.jsonl is cut back to the checkpoint on each resume): a step trained twice shows here twice."""
    return [int(m.group(1)) for m in _STEP_LINE.finditer(log.read_text(errors="replace"))]
