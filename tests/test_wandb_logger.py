"""The W&B backend with real `wandb` (offline) in real processes: run identity, kill and resume, fallbacks.

Each "job" below is a fresh process that builds the logger exactly as the trainer does (rank 0) and logs
records shaped like the trainer's; a killed job dies by SIGKILL, so W&B gets no `finish()`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import wandb  # noqa: F401 - a dependency: its absence must fail these tests, not skip them
from distributed_helpers import REPO, cpu_env

from dist_train.monitor import wandb_reader
from dist_train.monitor.jsonl import read_metrics
from dist_train.monitor.wandb_run import WANDB_ID_FILE

pytestmark = pytest.mark.slow  # each test runs real wandb in fresh processes

JOB = """
import json, os, signal, sys
from pathlib import Path
from dist_train.checkpoint.layout import TrainState
from dist_train.config import load_config
from dist_train.distributed.environment import ProcessPlace
from dist_train.monitor.metrics import build_logger

spec = json.loads(sys.argv[1])
cfg = load_config(None, spec["overrides"])
Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)  # the trainer's write_run_files does this
state = TrainState(step=spec["resume_step"], tokens=100 * spec["resume_step"], wandb_run_id=spec["state_id"])
place = ProcessPlace(rank=0, local_rank=0, world_size=1, host="h", slurm_node=None, slurm_job_id=None,
                     slurm_restart_count=0)
logger = build_logger(cfg, Path(cfg.run.out_dir), place, state, resumed=spec["resume_step"] > 0)
for step in range(spec["resume_step"] + 1, spec["last_step"] + 1):
    if step == spec["term_service_at"]:
        # What SLURM's TERM on a requeue does to the W&B service process (every process of the job gets it).
        import psutil
        for child in psutil.Process().children(recursive=True):
            child.terminate()
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    logger.log({"step": step, "loss": 10.0 / step, "lr": 1e-3, "tokens": 100 * step, "tokens_per_s": 5.0})
    if step % 4 == 0:
        logger.log({"step": step, "tokens": 100 * step, "val_loss": 20.0 / step, "val_ppl": 2.0})
print("STATE_ID", state.wandb_run_id, flush=True)
if spec["kill"]:
    os.kill(os.getpid(), signal.SIGKILL)
logger.summary({"final_step": spec["last_step"], "train_loss": 10.0 / spec["last_step"]})
logger.close()
"""


def job(run_dir: Path, resume_step: int, last_step: int, state_id: str | None = None, kill: bool = False,
        mode: str = "offline", env: dict[str, str] | None = None,
        term_service_at: int | None = None) -> tuple[str, subprocess.CompletedProcess]:
    spec = {"overrides": [f"run.out_dir={run_dir}", f"data.path={run_dir}", "wandb.enabled=true",
                          f"wandb.mode={mode}"],
            "resume_step": resume_step, "last_step": last_step, "state_id": state_id, "kill": kill,
            "term_service_at": term_service_at}
    proc = subprocess.run([sys.executable, "-c", JOB, json.dumps(spec)], check=False, cwd=REPO,
                          env=cpu_env(env), capture_output=True, text=True, timeout=180)
    assert proc.returncode == (-9 if kill else 0), proc.stderr
    (line,) = [s for s in proc.stdout.splitlines() if s.startswith("STATE_ID ")]
    return line.split()[1], proc


def rows_by_step(records: list[dict]) -> dict[int, dict]:
    """metrics.jsonl lines merged per step, as W&B merges the records of one step into one row."""
    merged: dict[int, dict] = defaultdict(dict)
    for r in records:
        merged[r["step"]].update({k: v for k, v in r.items() if k != "step"})
    return dict(merged)


def test_killed_then_resumed_job_continues_the_same_wandb_run_with_each_step_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first_id, _ = job(run_dir, resume_step=0, last_step=4)  # finishes: W&B holds steps 1-4 for sure
    # Resumed from a checkpoint at step 4, killed at step 10 (its last checkpoint at 8).
    job(run_dir, resume_step=4, last_step=10, state_id=first_id, kill=True)
    held_before_resume = wandb_reader.last_step(run_dir, first_id)
    assert held_before_resume is not None and 4 <= held_before_resume < 8, \
        f"W&B holds up to step {held_before_resume}: the kill lost none of the rows to catch up"

    resumed_id, _ = job(run_dir, resume_step=8, last_step=14, state_id=first_id)

    assert resumed_id == first_id == (run_dir / WANDB_ID_FILE).read_text().strip()
    files = wandb_reader.run_files(run_dir)
    assert [f.name for f in files] == [f"run-{first_id}.wandb"] * 3
    history = wandb_reader.read_history(run_dir, first_id)
    steps = [row["_step"] for row in history]
    assert steps == sorted(set(steps)), f"steps repeat or go back across the resume: {steps}"
    jsonl = rows_by_step(read_metrics(run_dir))
    assert steps == sorted(jsonl) == list(range(1, 15))
    for row in history:
        logged = {k: v for k, v in row.items() if not k.startswith("_")}
        assert logged == jsonl[row["_step"]], f"step {row['_step']}"


def test_an_unreadable_wandb_file_never_stops_training_on_resume(tmp_path: Path) -> None:
    """The catch-up reads the earlier `.wandb` files; a corrupt one is reported, and training goes on logging
    its new steps (not re-sending rows it cannot know W&B holds)."""
    run_dir = tmp_path / "run"
    first_id, _ = job(run_dir, resume_step=0, last_step=4)
    (corrupt,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    data = bytearray(corrupt.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the first record: its crc32 no longer matches
    corrupt.write_bytes(bytes(data))
    with pytest.raises(wandb_reader.WandbFileError):
        wandb_reader.last_step(run_dir, first_id)

    resumed_id, proc = job(run_dir, resume_step=4, last_step=6, state_id=first_id)  # exit code 0: job() checks

    assert resumed_id == first_id
    assert f"W&B: could not read the files of run {first_id}" in proc.stdout
    (new,) = [f for f in run_dir.glob("wandb/*run-*/run-*.wandb") if f != corrupt]
    assert [row["_step"] for row in wandb_reader.read_run_file(new).history] == [5, 6]


def test_a_wandb_service_killed_by_slurms_term_never_stops_training_and_the_next_start_catches_up(
        tmp_path: Path) -> None:
    """A requeue TERMs every process of the job, wandb-core too, while training saves and stops: the trainer
    must still reach its save (a W&B exception killed rank 0 mid-requeue), and the next start sends W&B the
    rows it lacks from metrics.jsonl."""
    run_dir = tmp_path / "run"
    first_id, proc = job(run_dir, resume_step=0, last_step=8, term_service_at=5)  # exit code 0: job() checks
    assert "W&B: logging step 5 failed" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("W&B logging stops for this start") == 1, "said once, not once per record"
    assert sorted(rows_by_step(read_metrics(run_dir))) == list(range(1, 9)), "metrics.jsonl has every step"

    job(run_dir, resume_step=8, last_step=10, state_id=first_id)

    assert [r["_step"] for r in wandb_reader.read_history(run_dir, first_id)] == list(range(1, 11))


def test_fresh_start_after_a_run_without_checkpoint_starts_a_new_wandb_run(tmp_path: Path) -> None:
    first_id, _ = job(tmp_path / "run", resume_step=0, last_step=3, kill=True)
    second_id, _ = job(tmp_path / "run", resume_step=0, last_step=3)
    assert second_id != first_id
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == second_id
    assert [r["_step"] for r in wandb_reader.read_history(tmp_path / "run", second_id)] == [1, 2, 3]


def test_online_without_an_api_key_falls_back_to_offline_and_says_how_to_upload(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    os.makedirs(env["HOME"])
    run_id, proc = job(tmp_path / "run", resume_step=0, last_step=2, mode="online", env=env)
    assert "W&B: online init failed" in proc.stdout and "logging offline instead" in proc.stdout
    assert f"W&B: run {run_id} (run), offline" in proc.stdout
    assert [r["_step"] for r in wandb_reader.read_history(tmp_path / "run", run_id)] == [1, 2]
