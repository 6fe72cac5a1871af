"""Training with W&B offline, end to end: 2 processes under torchrun, real DeepSpeed, real wandb.

What W&B holds is read back from the run's `.wandb` files with dist_train.monitor.wandb_reader (wandb's own protobuf
classes, no network) and compared with metrics.jsonl, key by key and step by step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import wandb  # noqa: F401 - a dependency: its absence must fail these tests, not skip them
from distributed_helpers import REPO, cpu_env, launch_training
from resume_helpers import command, kill_tree, logged_step, start, tail, wait_until

from dist_train.checkpoint.layout import read_client_state, read_latest
from dist_train.monitor import wandb_reader
from dist_train.monitor.jsonl import read_metrics
from dist_train.monitor.wandb_run import WANDB_ID_FILE

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny.yaml"


def overrides(shard_dir: Path, run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [f"data.path={shard_dir}", f"run.out_dir={run_dir}", "model.n_layers=2", "precision=fp32",
            f"train.max_steps={max_steps}", "train.warmup_steps=2", "train.log_every=2", "train.eval_every=4",
            "train.eval_steps=2", "wandb.enabled=true", "wandb.mode=offline", *extra]


def jsonl_rows(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (a log line and an eval line of one step make one W&B row)."""
    rows: dict[int, dict] = defaultdict(dict)
    for record in read_metrics(run_dir):
        rows[record["step"]].update({k: v for k, v in record.items() if k != "step"})
    return dict(rows)


MEASURED = ("tokens_per_s", "mfu", "mem_", "fwd_tokens_per_s", "slowest_rank", "checkpoint_")
"""Keys that measure the machine, not the model: they differ between a killed run and its re-run."""


def assert_history_equals_jsonl(history: list[dict], run_dir: Path, after_kill: bool = False) -> None:
    """Same steps, same keys per step, same values. After a kill, W&B may keep a step that the killed process
    logged and flushed and the resumed process trained again: its measured values differ, the rest agree."""
    jsonl = jsonl_rows(run_dir)
    steps = [row["_step"] for row in history]
    assert steps == sorted(jsonl), f"W&B steps {steps} != metrics.jsonl steps {sorted(jsonl)}"
    for row in history:
        logged = {k: v for k, v in row.items() if not k.startswith("_")}
        expected = jsonl[row["_step"]]
        assert sorted(logged) == sorted(expected), f"step {row['_step']}: keys differ"
        for key, value in expected.items():
            if after_kill and key.startswith(MEASURED):
                continue
            rel = 1e-6 if after_kill else 1e-12  # a resumed step may come from the killed process
            assert logged[key] == (pytest.approx(value, rel=rel) if value is not None else None), key


def test_two_process_offline_run_logs_to_one_wandb_run_what_metrics_jsonl_holds(shard_dir, tmp_path):
    run_dir, elsewhere = tmp_path / "tiny-wandb", tmp_path / "elsewhere"
    # A rank that created a W&B run without our `dir=` would write it under WANDB_DIR.
    proc = launch_training(TINY, overrides(shard_dir, run_dir, 6), nproc=2, launcher="torchrun",
                           extra_env={"WANDB_DIR": str(elsewhere)})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    files = wandb_reader.run_files(run_dir)
    assert len(files) == 1, f"expected one W&B run (rank 0 only), found {files}"
    assert list(elsewhere.rglob("*.wandb")) == []
    assert files[0].parent.name.startswith("offline-run-")
    run = wandb_reader.read_run_file(files[0])
    assert run.run_id == (run_dir / WANDB_ID_FILE).read_text().strip()
    assert f"W&B: run {run.run_id} (tiny-wandb), offline; upload later: wandb sync {files[0].parent}" \
        in proc.stdout
    assert run.name == "tiny-wandb" and run.exit_code == 0
    assert run.config["run"]["out_dir"] == str(run_dir) and run.config["model"]["n_layers"] == 2
    assert_history_equals_jsonl(run.history, run_dir)
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gib", "skipped_steps",
            "fwd_tokens_per_s/rank_0", "fwd_tokens_per_s/rank_1", "slowest_rank"} <= set(run.history[0])
    assert {"val_loss", "val_ppl"} <= set(run.history[1])  # step 4: a log line and an eval
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_step", "train_loss", "val_loss", "tokens", "wall_s"):
        assert run.summary[key] == pytest.approx(summary[key]), key

    png = run_dir / "curves.png"
    plot = subprocess.run([sys.executable, "-m", "dist_train.plot", str(run_dir), "--out", str(png)],
                          check=False, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_killed_run_resumes_the_same_wandb_run_and_its_steps_continue_once_each(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = command(overrides(shard_dir, run_dir, 10, "checkpoint.every=4"), nproc=2)
    log = tmp_path / "train.log"
    first = start(cmd, log)
    try:  # SIGKILL every process once step 6 is logged: after the step-4 checkpoint, before step 8's
        wait_until(lambda: logged_step(run_dir) >= 6 and read_latest(run_dir / "checkpoints") is not None,
                   first)
    finally:
        kill_tree(first)
    first_id = (run_dir / WANDB_ID_FILE).read_text().strip()

    second = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900,
                            check=False)
    assert second.returncode == 0, f"{tail(log)}\n{second.stdout[-3000:]}\n{second.stderr[-5000:]}"
    assert "resumed" in second.stdout

    assert (run_dir / WANDB_ID_FILE).read_text().strip() == first_id
    latest = read_latest(run_dir / "checkpoints")
    assert read_client_state(latest)["train_state"]["wandb_run_id"] == first_id
    files = wandb_reader.run_files(run_dir)
    assert [f.name for f in files] == [f"run-{first_id}.wandb"] * 2  # one offline folder per start
    history = wandb_reader.read_history(run_dir, first_id)  # both files, oldest first
    steps = [row["_step"] for row in history]
    assert steps == [2, 4, 6, 8, 10], f"steps must continue once each across the resume: {steps}"
    assert_history_equals_jsonl(history, run_dir, after_kill=True)
