"""Background checkpoint saves (checkpoint.async_save): training goes on while the files are written, and the
guarantees of blocking saves hold - nothing is published before every rank has written its files, a kill while
they are being written leaves `latest` at the previous checkpoint, and the resumed run ends bit-identical to an
uninterrupted (blocking-save) run."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from resume_helpers import (
    EVERY,
    assert_same_end,
    checkpoint,
    command,
    kill_while_writing_a_save,
    overrides,
    run,
    shared_run,
    tail,
)

from dist_train.checkpoint.verify import check
from dist_train.checkpoint.writer import RankWriter

ZERO2 = ("deepspeed.zero_stage=2",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """2 processes, ZeRO-2, 6 steps, a blocking checkpoint every 2 (shared with test_resume)."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, *ZERO2)


@pytest.mark.slow
def test_a_kill_during_a_background_save_keeps_latest_and_the_resumed_run_matches_blocking_saves(
        reference, shard_dir, tmp_path):
    cmd = command(overrides(shard_dir, tmp_path, *ZERO2, "checkpoint.async_save=true"), nproc=2)
    log, checkpoints = tmp_path / "train.log", tmp_path / "checkpoints"

    step, _ = kill_while_writing_a_save(cmd, log, checkpoints)
    print(f"killed while writing step {step} in the background")
    assert (checkpoints / "latest").read_text().strip() == f"step_{step - EVERY:08d}"
    assert not checkpoint(tmp_path, step).exists()

    assert run(cmd, log) == 0, tail(log)
    assert f"resumed from {checkpoint(tmp_path, step - EVERY)} at step {step - EVERY}" in log.read_text()
    assert_same_end(tmp_path, reference)
    for path in sorted(checkpoints.glob("step_*")):
        assert check(path, "full") is None, path
    stalls = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stalls if "checkpoint_s" in r][-1] == 6


def test_a_background_write_saves_the_state_as_it_was_when_save_returned(tmp_path):
    """Training changes the tensors in place right after `save` returns: the file must hold the values of that
    moment (a snapshot), even though it is written later. The writer thread is held until the change is made."""
    writer = RankWriter(0, background=True)
    gate = threading.Event()
    writer._pool.submit(gate.wait)  # the writer thread is busy until the tensors have changed
    weight = torch.arange(8, dtype=torch.float32)
    writer.save({"weight": weight, "tied": weight, "step": 3}, tmp_path / "state.pt")
    weight.add_(100)
    assert not writer.done()
    gate.set()
    writer.wait()
    assert writer.error is None and writer.done()
    saved = torch.load(tmp_path / "state.pt")
    assert torch.equal(saved["weight"], torch.arange(8, dtype=torch.float32)) and saved["step"] == 3
    assert saved["tied"].data_ptr() == saved["weight"].data_ptr(), "a tensor saved twice stays one tensor"
    assert writer.written[str(tmp_path / "state.pt")]["bytes"] == (tmp_path / "state.pt").stat().st_size


def test_a_failed_background_write_is_recorded_not_raised(tmp_path):
    writer = RankWriter(1, background=True)
    writer.save({"x": torch.ones(2)}, tmp_path / "missing_folder" / "state.pt")
    writer.wait()
    assert "rank 1 writing" in str(writer.error) and not writer.error.disk_full
