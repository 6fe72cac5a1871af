"""Training through real SLURM daemons: sbatch, srun, requeue and scancel on the two-node test cluster
(tests/slurm/cluster.sh), with real training processes on the CPU.

Who stops a job, and what becomes of it: the time-limit warning (USR1 to the batch shell) saves and requeues;
SLURM's own TERM (`scontrol requeue`, preemption) saves and leaves the job to SLURM, which requeues it;
`launch.slurm cancel` (USR2 to the batch shell) saves and cancels.

Each test submits with `python -m launch.slurm` exactly as a user would and then reads the run folder:
`metrics.jsonl` (one line per step here), `ranks.jsonl` (one line per rank per start), `checkpoints/latest`,
`summary.json`, and the job's log `RUN_DIR/slurm/JOBID.out`.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from resume_helpers import slow_save_env
from slurm_helpers import (
    ACTIVE_STATES,
    NODES,
    TINY,
    Cluster,
    job_env,
    latest_checkpoint_step,
    logged_steps,
    read_jsonl,
    slurm_cli,
    tail,
    tiny_run,
    trained_steps,
)

from launch.slurm import job_status

pytestmark = pytest.mark.slow


def submit(run_dir: Path, overrides: list[str], *options: str, env: dict[str, str] | None = None
           ) -> tuple[str, Path]:
    """Submit a CPU job on both nodes, one training process each; return the job id and its log."""
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--json",
                     *options, *overrides, env=env or job_env())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert Path(result["script"]) == run_dir / "slurm" / "job.sbatch"
    return result["job_id"], Path(result["log"])


def wait_for_step(cluster: Cluster, job_id: str, run_dir: Path, log: Path, step: int,
                  timeout_s: float = 180) -> int:
    """Wait until the running job has logged `step`; return the newest step seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = trained_steps(run_dir)
        if steps and steps[-1] >= step:
            return steps[-1]
        state = job_status(job_id)["state"]
        if state not in ACTIVE_STATES:
            pytest.fail(f"job {job_id} ended ({state}) before step {step}; its log:\n{tail(log)}")
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not reach step {step} within {timeout_s:.0f} s; its log:\n{tail(log)}")


def starts(run_dir: Path) -> dict[int, list[dict]]:
    """ranks.jsonl grouped by SLURM restart count: one entry per rank per start of the job."""
    out: dict[int, list[dict]] = {}
    for line in read_jsonl(run_dir / "ranks.jsonl"):
        out.setdefault(line["slurm_restart_count"], []).append(line)
    return out


def test_two_node_job_trains_tiny_config_to_its_last_step_and_completes(slurm_cluster, shard_dir, tmp_path):
    run_dir = tmp_path / "two_nodes"
    job_id, log = submit(run_dir, tiny_run(shard_dir, run_dir, "train.max_steps=6", "checkpoint.every=3"))
    proc = slurm_cli("status", job_id, "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["job_id"], status["name"], status["log"]) == (job_id, "dist_train-two_nodes", str(log))

    status = slurm_cluster.wait_for_end(job_id, log)
    assert status["state"] == "COMPLETED", tail(log)
    assert status["exit_code"] == "0:0"
    assert trained_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint_step(run_dir) == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 6
    assert summary["world_size"] == 2

    ranks = starts(run_dir)
    assert list(ranks) == [0], "one start, no restart"
    assert sorted(r["rank"] for r in ranks[0]) == [0, 1]
    assert {r["world_size"] for r in ranks[0]} == {2}
    assert sorted(r["slurm_node"] for r in ranks[0]) == list(NODES), "one rank on each node"
    assert {r["slurm_job_id"] for r in ranks[0]} == {job_id}
    assert all(r["host"] for r in ranks[0])
    assert "training exited with code 0" in log.read_text()


def wait_for_restart(cluster: Cluster, job_id: str, run_dir: Path, log: Path, restart: int,
                     timeout_s: float = 180) -> int:
    """Wait until every rank of the job's `restart`-th start is up; return the step it resumed from."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ranks = starts(run_dir).get(restart, [])
        if len(ranks) == 2:
            resumed_at = {r["start_step"] for r in ranks}
            assert len(resumed_at) == 1, f"the ranks of start {restart} resumed from different steps: {ranks}"
            return resumed_at.pop()
        status = job_status(job_id)
        if status["state"] not in ACTIVE_STATES:
            pytest.fail(f"job {job_id} ended ({status['state']}, restarts {status['restarts']}) instead of "
                        f"starting again; its log:\n{tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not start again within {timeout_s:.0f} s; its log:\n{tail(log)}")


def test_time_limit_warning_and_scontrol_requeue_each_save_and_the_job_resumes_without_training_a_step_twice(
        slurm_cluster, shard_dir, tmp_path):
    max_steps = 24
    run_dir = tmp_path / "preempted"
    # No periodic checkpoints: the only ones a start can leave are those the signals make.
    overrides = tiny_run(shard_dir, run_dir, f"train.max_steps={max_steps}", "checkpoint.every=0",
                         "wandb.enabled=true", "wandb.mode=offline")
    job_id, log = submit(run_dir, overrides)
    seen = [wait_for_step(slurm_cluster, job_id, run_dir, log, step=2)]
    # What `--signal=B:USR1@grace` does when the time limit nears: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    resumed_at = [wait_for_restart(slurm_cluster, job_id, run_dir, log, restart=1)]
    seen.append(wait_for_step(slurm_cluster, job_id, run_dir, log, step=resumed_at[0] + 2))
    # What SLURM does to a preempted job on a PreemptMode=REQUEUE partition, and an admin by hand: TERM to
    # every process of the job (KILL after KillWait), then the job goes back to the queue.
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    resumed_at.append(wait_for_restart(slurm_cluster, job_id, run_dir, log, restart=2))

    status = slurm_cluster.wait_for_end(job_id, log)
    text = log.read_text()
    assert status["state"] == "COMPLETED", tail(log)
    assert status["restarts"] == 2
    assert text.count("training exited with code 75") == 2, tail(log)
    assert "SLURM_RESTART_COUNT=2" in text
    # Each start resumed from the checkpoint its predecessor saved when signalled: past every step seen before
    # the signal (earlier would train a step twice), short of max_steps (nothing left to do otherwise).
    for before, after in zip(seen, resumed_at):
        assert before <= after < max_steps
    assert logged_steps(log) == list(range(1, max_steps + 1)), "every step trained once, over the three starts"
    assert trained_steps(run_dir) == list(range(1, max_steps + 1))
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == max_steps

    ranks = starts(run_dir)
    assert sorted(ranks) == [0, 1, 2], "the job started three times"
    assert [sorted(r["slurm_node"] for r in ranks[k]) for k in (0, 1, 2)] == [list(NODES)] * 3
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 3, "one W&B folder per start"
    assert len({p.name.rsplit("-", 1)[-1] for p in wandb_runs}) == 1, "the restarts continue the same W&B run"


def test_requeued_job_cancelled_with_launch_slurm_cancel_saves_and_ends_cancelled(slurm_cluster, shard_dir,
                                                                                   tmp_path):
    """Under the deepspeed launcher: SLURM's requeue TERM reaches the launcher and the trainers; the job must stay
    requeued. The user's cancel of the restarted job then saves and ends the job for good."""
    run_dir = tmp_path / "requeued_then_cancelled"
    overrides = tiny_run(shard_dir, run_dir, "train.max_steps=100000", "checkpoint.every=0")
    job_id, log = submit(run_dir, overrides, "--launcher", "deepspeed")
    seen = wait_for_step(slurm_cluster, job_id, run_dir, log, step=2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    resumed_at = wait_for_restart(slurm_cluster, job_id, run_dir, log, restart=1)
    assert seen <= resumed_at, "the requeue's TERM saved a checkpoint past every step seen before it"
    wait_for_step(slurm_cluster, job_id, run_dir, log, step=resumed_at + 2)
    proc = slurm_cli("cancel", job_id, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"job_id": job_id, "cancel_requested": True}

    status = slurm_cluster.wait_for_end(job_id, log)
    assert (status["state"], status["restarts"]) == ("CANCELLED", 1), tail(log)
    # The trainers' exit code 75 came back through the deepspeed launcher and srun to the batch script.
    assert "training exited with code 75" in log.read_text(), tail(log)
    steps = logged_steps(log)
    assert steps == list(range(1, steps[-1] + 1)), "every step trained once, over both starts"
    assert latest_checkpoint_step(run_dir) == steps[-1] == trained_steps(run_dir)[-1], \
        "the cancel saved the last step trained"
    ranks = starts(run_dir)
    assert sorted(ranks) == [0, 1]
    assert sorted((r["rank"], r["slurm_node"]) for r in ranks[1]) == [(0, NODES[0]), (1, NODES[1])]
    assert {r["world_size"] for r in ranks[1]} == {2}


SLOW_SAVE_S = 35
"""Longer than the test cluster's KillWait (30 s) and than the 30 s after which deepspeed's launcher SIGKILLs
the trainers it has TERMed: a save this slow survives only if neither ever starts counting."""


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_cancel_during_a_save_slower_than_killwait_still_publishes_the_checkpoint(slurm_cluster, shard_dir,
                                                                                  tmp_path, launcher):
    run_dir = tmp_path / "cancelled"
    overrides = tiny_run(shard_dir, run_dir, "train.max_steps=100000", "checkpoint.every=0")
    env = {**job_env(), **slow_save_env(tmp_path / "hook", SLOW_SAVE_S)}
    job_id, log = submit(run_dir, overrides, "--launcher", launcher, "--grace", "120", env=env)
    seen = wait_for_step(slurm_cluster, job_id, run_dir, log, step=2)
    proc = slurm_cli("cancel", job_id, "--json")
    cancelled_at = time.monotonic()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"job_id": job_id, "cancel_requested": True}

    status = slurm_cluster.wait_for_end(job_id, log)
    took = time.monotonic() - cancelled_at
    print(f"{launcher}: cancelled after step {seen}; the job ended {took:.0f} s later")
    assert status["state"] == "CANCELLED" and status["restarts"] == 0, tail(log)
    saved = latest_checkpoint_step(run_dir)
    assert saved is not None, f"no checkpoint was published on cancel; the log:\n{tail(log)}"
    assert "training exited with code 75" in log.read_text(), tail(log)
    assert saved >= seen
    assert saved == trained_steps(run_dir)[-1], "the checkpoint holds the last step trained"
    assert (run_dir / "checkpoints" / f"step_{saved:08d}" / "client_state.json").exists()
    assert took > SLOW_SAVE_S, "the save was not slowed down: the test proves nothing"


def test_local_srun_without_sbatch_trains_two_processes_on_one_node(slurm_cluster, shard_dir, tmp_path):
    run_dir = tmp_path / "local_srun"
    proc = slurm_cli("run", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--cpu",
                     *tiny_run(shard_dir, run_dir, "train.max_steps=4", "checkpoint.every=0"),
                     env=job_env(), timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert trained_steps(run_dir) == [1, 2, 3, 4]
    ranks = starts(run_dir)[0]
    assert sorted((r["rank"], r["local_rank"]) for r in ranks) == [(0, 0), (1, 1)]
    assert {r["world_size"] for r in ranks} == {2}
    assert len({r["slurm_node"] for r in ranks}) == 1, "both processes on the one node"
    assert len({r["slurm_job_id"] for r in ranks}) == 1 and ranks[0]["slurm_job_id"], "srun made an allocation"


def test_status_of_an_unknown_job_says_so(slurm_cluster):
    proc = slurm_cli("status", "999999")
    assert proc.returncode == 1
    assert "error: job 999999 is not known to SLURM" in proc.stderr
