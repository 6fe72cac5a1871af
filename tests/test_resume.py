"""Kills and signals: a run that is SIGKILLed (also while writing a checkpoint) or SIGTERMed and re-run with the
same command ends with the weights, optimizer state and logged losses of an uninterrupted run, bit for bit."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import psutil
import pytest
import torch
from distributed_helpers import REPO
from resume_helpers import (
    EVERY,
    STEPS,
    TINY,
    assert_same_end,
    checkpoint,
    command,
    kill_tree,
    kill_while_writing_a_save,
    logged_step,
    overrides,
    run,
    shared_run,
    slow_save_env,
    start,
    tail,
    wait_until,
    workers,
)

from dist_train.checkpoint.layout import CLIENT_STATE
from dist_train.monitor.jsonl import read_metrics
from dist_train.train.preflight import cpu_runs_fp16
from dist_train.train.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

ZERO2 = ("deepspeed.zero_stage=2",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """2 processes, ZeRO-2, 6 steps, a checkpoint every 2, never interrupted."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, *ZERO2)


VARIANTS = {"fp32": (), "bf16": ("precision=bf16",), "num_workers": ("data.num_workers=2",),
            "fp16": ("precision=fp16", "deepspeed.fp16_initial_scale_power=20"),
            "moe_ep2": ("model.moe.num_experts=4", "parallel.expert=2"),
            "document_mask": ("data.document_mask=true",)}
"""Runs that must resume bit for bit: the reference's fp32 run, bf16 (DeepSpeed's bf16 optimizer restores the
fp32 master weights and rebuilds the bf16 ones), batches prepared ahead by loader workers (those prepared but
not yet trained on at a save must be neither skipped nor repeated), and fp16 with a loss scale that overflows
in steps 1-3 (2^20, hysteresis 2): resumed from step 2 with the scaler reset, step 3 would not be the same; and a
Mixture-of-Experts model with its experts split over the 2 processes (each expert's weights and Adam moments in
the files of its expert-parallel rank); and a run with each document of a window masked apart (data.document_mask)."""

_NO_FP16 = not cpu_runs_fp16() and not torch.cuda.is_available()


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.skipif(v == "fp16" and _NO_FP16,
                                                                             reason="no fp16 on this CPU"))
                                     for v in VARIANTS])
def test_resume_after_sigkills_matches_uninterrupted_run(reference, tmp_path_factory, shard_dir, tmp_path, variant):
    extra = (*ZERO2, *VARIANTS[variant])
    if variant != "fp32":
        reference = shared_run(tmp_path_factory, shard_dir, f"zero2_x2_{variant}", 2, *extra)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    first = rng.randint(1, 3)
    # Two kills for the fp32 run; one (after the first checkpoint) is enough to resume the other variants.
    kill_after = [first, rng.randint(first + 2, STEPS - 1)]
    if variant != "fp32":
        kill_after = [rng.randint(EVERY + 1, STEPS - 1)]
    print(f"seed {seed}: SIGKILL after steps {kill_after} (checkpoints every {EVERY})")
    cmd, log = command(overrides(shard_dir, tmp_path, *extra), nproc=2), tmp_path / "train.log"
    for step in kill_after:
        proc = start(cmd, log)
        wait_until(lambda step=step: logged_step(tmp_path) >= step, proc)
        kill_tree(proc)
        latest = tmp_path / "checkpoints" / "latest"
        print(f"killed at logged step {logged_step(tmp_path)}; latest: "
              f"{latest.read_text().strip() if latest.exists() else None}")
    assert run(cmd, log) == 0, tail(log)
    assert log.read_text().count("resumed from") >= 1
    assert_same_end(tmp_path, reference)
    if variant == "fp16":
        scales = [(r["loss_scale"], r["overflow_steps"]) for r in read_metrics(reference) if "loss" in r]
        print(f"reference (loss scale, overflows) per step: {scales}")
        assert scales[1] == (2.0**19, 2) and scales[-1] == (2.0**18, 3), "the scaler must be mid-search at step 2"


def test_kill_while_writing_a_checkpoint_leaves_latest_at_the_previous_one(reference, shard_dir, tmp_path):
    cmd, log = command(overrides(shard_dir, tmp_path, *ZERO2), nproc=2), tmp_path / "train.log"
    checkpoints = tmp_path / "checkpoints"

    step, partial = kill_while_writing_a_save(cmd, log, checkpoints)
    print(f"killed while writing step {step}: {sorted(p.name for p in partial.rglob('*'))}")
    assert not (partial / f"step_{step:08d}" / "client_state.json").exists()
    assert (checkpoints / "latest").read_text().strip() == f"step_{step - EVERY:08d}"
    assert not checkpoint(tmp_path, step).exists()

    assert run(cmd, log) == 0, tail(log)
    assert f"resumed from {checkpoint(tmp_path, step - EVERY)} at step {step - EVERY}" in log.read_text()
    assert not list(checkpoints.glob(".tmp_*")), "the interrupted save was cleaned up"
    assert_same_end(tmp_path, reference)


def test_sigterm_saves_at_the_step_boundary_exits_75_and_resumes(reference, shard_dir, tmp_path):
    cmd = command(overrides(shard_dir, tmp_path, *ZERO2), nproc=2, launcher="deepspeed")
    log, checkpoints = tmp_path / "train.log", tmp_path / "checkpoints"
    proc = start(cmd, log)
    wait_until(lambda: logged_step(tmp_path) >= 2, proc)
    ranks = workers(proc)
    assert len(ranks) == 2
    signalled_at = logged_step(tmp_path)
    ranks[1].send_signal(signal.SIGTERM)  # one rank is enough: the flag is all-reduced with the loss

    def saving() -> bool:
        return proc.poll() is not None or any(int(p.name[-8:]) > signalled_at for p in checkpoints.glob(".tmp_step_*"))

    wait_until(saving, proc, poll_s=0.0002) if proc.poll() is None else None
    for rank in ranks:  # a second signal, and a third of the other kind, during the save: ignored
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(psutil.NoSuchProcess):  # the rank may have exited already
                rank.send_signal(sig)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, tail(log)
    stopped = logged_step(tmp_path)
    print(f"SIGTERM after step {signalled_at}; stopped and saved at step {stopped}")
    assert signalled_at < stopped <= signalled_at + 2
    assert (checkpoints / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert f"saved step {stopped}, exiting with {EXIT_PREEMPTED}" in log.read_text()

    assert run(cmd, log) == 0, tail(log)
    assert f"resumed from {checkpoint(tmp_path, stopped)} at step {stopped}" in log.read_text()
    assert_same_end(tmp_path, reference)


SLOW_SAVE_S = 35
"""Longer than the 30 s after which deepspeed's per-node launcher SIGKILLs the trainers it has TERMed."""


def test_term_during_a_save_slower_than_the_launchers_kill_delay_still_publishes_it(shard_dir, tmp_path):
    """TERM to the process group of `launch/run_local.sh` (a Ctrl-C, a hang-up, `kill -- -PGID`): the
    launchers never see it, the trainers get a save request and take the 35 s the save needs."""
    cmd = ["bash", str(REPO / "launch" / "run_local.sh"), "2", "--config", str(TINY),
           *overrides(shard_dir, tmp_path, "train.max_steps=100000", "checkpoint.every=0")]
    log = tmp_path / "train.log"
    proc = start(cmd, log, env=slow_save_env(tmp_path / "hook", SLOW_SAVE_S), start_new_session=True)
    try:
        wait_until(lambda: logged_step(tmp_path) >= 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.wait(timeout=240) == EXIT_PREEMPTED, tail(log)
        waited = time.monotonic() - signalled
    finally:
        kill_tree(proc)
    stopped = logged_step(tmp_path)
    print(f"TERM, then the save took {waited:.0f} s; stopped at step {stopped}")
    assert waited > SLOW_SAVE_S, "the save was not slowed down: the test proves nothing"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert (checkpoint(tmp_path, stopped) / CLIENT_STATE).exists()
    assert f"saved step {stopped}, exiting with {EXIT_PREEMPTED}" in log.read_text()
