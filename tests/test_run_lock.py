"""One training run per run folder: a second `launch/train.py` on a folder in use is refused (exit 2, naming the
holder) before it writes anything there, the first run ends exactly as if alone, and a lock left by a run killed
with SIGKILL never blocks the next start. Real 2-process trainings under torchrun."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
from resume_helpers import (assert_same_end, command, kill_tree, logged_step, overrides, run, shared_run,
                            slow_save_env, start, tail)

from dist_train.train.run_lock import LOCK_FILE

pytestmark = pytest.mark.slow  # real trainings

ZERO2 = ("deepspeed.zero_stage=2",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """The uninterrupted 2-process ZeRO-2 run shared with test_resume (same name, trained once per session)."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, *ZERO2)


def wait_for_step(proc, run_dir: Path, log: Path, step: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while logged_step(run_dir) < step:
        assert proc.poll() is None, f"training ended before step {step}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s:.0f} s:\n{tail(log)}"
        time.sleep(0.2)


def folder_state(run_dir: Path) -> dict[str, str]:
    """Every file of the run folder but the ones the running first run keeps writing."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob("checkpoints/step_*/*")) if p.is_file()}


def test_a_second_training_on_a_folder_in_use_is_refused_naming_the_holder_and_the_first_ends_as_if_alone(
        tmp_path, shard_dir, reference):
    run_dir = tmp_path / "run"
    first_log = tmp_path / "first.log"
    # Each save of the first run takes 20 s longer: a window in which the second one starts for sure.
    first = start(command(overrides(shard_dir, run_dir, *ZERO2), 2), first_log,
                  env=slow_save_env(tmp_path / "hook", 20))
    try:
        wait_for_step(first, run_dir, first_log, step=2)
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        before = folder_state(run_dir)
        second_log = tmp_path / "second.log"
        # One process, so that its exit code is launch/train.py's own (torchrun reports any failed worker as 1).
        rc = run(command(overrides(shard_dir, run_dir, *ZERO2), 1, launcher="python"), second_log, timeout=300)
        second = second_log.read_text()
        assert first.poll() is None, "the first run was still training when the second was refused"
        assert rc == 2, second[-4000:]
        assert f"run.out_dir {run_dir} is in use by another training run" in second, second[-4000:]
        assert f"PID {holder['pid']} on host {socket.gethostname()}, started {holder['started']}" in second
        assert "Traceback" not in second
        assert folder_state(run_dir) == before, "the refused run changed no checkpoint"
        assert first.wait(timeout=600) == 0, tail(first_log)
    finally:
        kill_tree(first)
    assert_same_end(run_dir, reference)


def test_a_lock_left_by_a_run_killed_with_sigkill_does_not_block_the_next_start(tmp_path, shard_dir, reference):
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    killed = start(command(overrides(shard_dir, run_dir, *ZERO2), 2), log)
    try:
        wait_for_step(killed, run_dir, log, step=3)
    finally:
        kill_tree(killed)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] > 0, "the dead run's lock file is still there"

    rc = run(command(overrides(shard_dir, run_dir, *ZERO2), 2), log)

    assert rc == 0, tail(log)
    assert "in use by another training run" not in log.read_text()
    assert_same_end(run_dir, reference)
