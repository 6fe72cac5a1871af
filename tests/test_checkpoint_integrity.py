"""Checkpoints that bad disks cannot fool: every file's size and sha256 are checked before a load (a flipped byte,
a truncated copy, a missing file is never loaded), a corrupt `latest` is set aside for the newest good checkpoint,
and a save that finds the disk full stops the run with exit code 74 and the previous checkpoint intact."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest
from distributed_helpers import launch_training
from resume_helpers import (
    EVERY,
    TINY,
    assert_same_end,
    checkpoint,
    command,
    overrides,
    run,
    shared_run,
    start,
    tail,
    wait_until,
    workers,
)

from dist_train.checkpoint.layout import CLIENT_STATE, tag_for
from dist_train.checkpoint.resume import find_checkpoint
from dist_train.checkpoint.verify import FILES_LIST, CorruptCheckpoint, check, write_files_list
from dist_train.distributed.environment import ProcessPlace
from dist_train.monitor import wandb_reader
from dist_train.train.trainer import EXIT_DISK_FULL

PLACE = ProcessPlace(rank=0, local_rank=0, world_size=1, host="test", slurm_node=None, slurm_job_id=None,
                     slurm_restart_count=0)
ZERO2 = ("deepspeed.zero_stage=2",)
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def small_checkpoint(run_dir, step):
    """A published checkpoint as far as verification reads it: a few files and their files.json."""
    path = run_dir / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    (path / CLIENT_STATE).write_text(json.dumps({"train_state": {"step": step}}))
    (path / SHARD).write_bytes(bytes(range(256)) * 64)
    write_files_list(path, {})
    (run_dir / "checkpoints" / "latest").write_text(path.name + "\n")
    return path


def test_sizes_catch_a_truncated_file_and_hashes_a_flipped_byte(tmp_path):
    ckpt = small_checkpoint(tmp_path, 2)
    assert check(ckpt, "full") is None
    flip_byte(ckpt / SHARD)
    assert check(ckpt, "sizes") is None, "a flipped byte keeps the size: only the hash sees it"
    problem = check(ckpt, "full")
    assert problem.file == ckpt / SHARD and "sha256 differs" in str(problem)
    (ckpt / SHARD).write_bytes((ckpt / SHARD).read_bytes()[:-100])
    problem = check(ckpt, "sizes")
    assert problem.file == ckpt / SHARD and "16,284 bytes, but 16,384 were written" in str(problem)
    (ckpt / SHARD).unlink()
    assert str(check(ckpt, "sizes")) == f"{ckpt / SHARD}: missing"
    (ckpt / FILES_LIST).unlink()
    assert check(ckpt, "sizes").file == ckpt / FILES_LIST


def test_a_corrupt_latest_is_moved_aside_and_the_newest_good_checkpoint_is_resumed(tmp_path, capsys):
    for step in (2, 4, 6):
        small_checkpoint(tmp_path, step)
    flip_byte(checkpoint(tmp_path, 6) / SHARD)
    (checkpoint(tmp_path, 4) / CLIENT_STATE).write_text("{}")  # another size: a half-synced copy
    events = []
    assert find_checkpoint(tmp_path, "latest", PLACE, "full", events) == checkpoint(tmp_path, 2)
    corrupt = tmp_path / "checkpoints" / "corrupt"
    assert [(e["checkpoint"], e["file"], e["moved_to"]) for e in events] == [
        ("step_00000006", str(checkpoint(tmp_path, 6) / SHARD), str(corrupt / "step_00000006")),
        ("step_00000004", str(checkpoint(tmp_path, 4) / CLIENT_STATE), str(corrupt / "step_00000004"))]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002\n"
    assert sorted(p.name for p in corrupt.iterdir()) == ["step_00000004", "step_00000006"]
    assert f"CORRUPT CHECKPOINT step_00000006: {checkpoint(tmp_path, 6) / SHARD}: sha256" in capsys.readouterr().err


def test_when_no_checkpoint_verifies_the_run_is_refused_not_started_over(tmp_path):
    small_checkpoint(tmp_path, 2)
    flip_byte(checkpoint(tmp_path, 2) / SHARD)
    for _ in range(2):  # and again on the next start: `latest` still names the checkpoint that failed
        with pytest.raises(CorruptCheckpoint, match="no checkpoint in .* verifies"):
            find_checkpoint(tmp_path, "latest", PLACE, "full", [])


def test_an_explicit_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt = small_checkpoint(tmp_path, 2)
    (ckpt / SHARD).write_bytes(b"short")
    with pytest.raises(CorruptCheckpoint, match=f"refused, the checkpoint is corrupt: {ckpt / SHARD}: 5 bytes"):
        find_checkpoint(tmp_path, str(ckpt), PLACE, "sizes")
    assert ckpt.exists(), "an explicit checkpoint is refused, not moved"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """2 processes, ZeRO-2, 6 steps, a checkpoint every 2, never interrupted (shared with test_resume)."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, *ZERO2)


@pytest.mark.slow
def test_a_flipped_byte_in_latest_resumes_from_the_previous_checkpoint_bit_identically(reference, shard_dir,
                                                                                      tmp_path):
    """The reference run, copied without its summary.json (as if killed just after its last save: a finished run
    is a no-op to re-run), with one byte of rank 1's optimizer shard in `latest` (step 6) flipped: re-running the
    same command sets step 6 aside, trains steps 5-6 again from step 4 and ends bit-identical to the
    uninterrupted run; the event is in metrics.jsonl and W&B. `--resume` of that checkpoint is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()
    flip_byte(checkpoint(run_dir, 6) / SHARD)
    log = tmp_path / "train.log"
    assert run(command(overrides(shard_dir, run_dir, *ZERO2, "wandb.enabled=true"), nproc=2), log) == 0, tail(log)
    text = log.read_text()
    corrupt = run_dir / "checkpoints" / "corrupt" / "step_00000006"
    assert f"CORRUPT CHECKPOINT step_00000006: {checkpoint(run_dir, 6) / SHARD}: sha256 differs" in text
    assert f"resumed from {checkpoint(run_dir, 4)} at step 4" in text
    assert_same_end(run_dir, reference)
    events = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" in r]
    assert events == [{"step": 4, "event": "corrupt_checkpoint", "checkpoint": "step_00000006",
                       "file": str(checkpoint(run_dir, 6) / SHARD), "reason": events[0]["reason"],
                       "moved_to": str(corrupt)}]
    history = wandb_reader.read_history(run_dir)
    assert [row["_step"] for row in history if "corrupt_checkpoint/count" in row] == [4]

    proc = launch_training(TINY, overrides(shard_dir, tmp_path / "other", *ZERO2), nproc=1, launcher="python",
                           args=["--resume", str(corrupt)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"error: --resume {corrupt}: refused, the checkpoint is corrupt: {corrupt / SHARD}: sha256 differs"
            in proc.stderr)


@pytest.mark.slow
def test_a_full_disk_during_a_save_exits_74_and_leaves_the_previous_checkpoint_latest(reference, shard_dir,
                                                                                     tmp_path):
    """A real EFBIG: once a checkpoint is published, both training processes get a 1 MB file-size limit
    (RLIMIT_FSIZE, set from outside with prlimit); every shard of the next save is larger. The run stops with
    exit code 74 and the documented message, the partial checkpoint is gone, `latest` still names the previous
    one, and re-running the same command resumes from it and ends bit-identical to the uninterrupted run."""
    # The deepspeed launcher passes the trainers' exit code on (torchrun turns any failure into 1).
    cmd = command(overrides(shard_dir, tmp_path, *ZERO2), nproc=2, launcher="deepspeed")
    log, checkpoints = tmp_path / "train.log", tmp_path / "checkpoints"
    proc = start(cmd, log)
    wait_until(lambda: (checkpoints / "latest").exists(), proc)
    limit = 1 << 20
    for rank in workers(proc):
        rank.rlimit(psutil.RLIMIT_FSIZE, (limit, limit))
    kept = (checkpoints / "latest").read_text().strip()
    failed = tag_for(int(kept[5:]) + EVERY)
    assert proc.wait(timeout=300) == EXIT_DISK_FULL, tail(log)
    text = log.read_text()
    print(f"limit set with latest = {kept}; the save of {failed} failed:\n"
          f"{[line for line in text.splitlines() if line.startswith('error:')]}")
    assert f"error: checkpoint {failed} could not be written (rank " in text
    assert "File too large" in text
    assert (f"the partial checkpoint was removed and {checkpoints / 'latest'} still names {kept}. Stopping with "
            f"exit code {EXIT_DISK_FULL}: free space") in text
    assert (checkpoints / "latest").read_text().strip() == kept
    assert not (checkpoints / failed).exists() and not list(checkpoints.glob(".tmp_*"))
    assert check(checkpoints / kept, "full") is None

    assert run(cmd, log) == 0, tail(log)
    assert f"resumed from {checkpoints / kept} at step {int(kept[5:])}" in log.read_text()
    assert_same_end(tmp_path, reference)

