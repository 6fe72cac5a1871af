"""Resuming a Mixture-of-Experts run at another expert-parallel size or world size (issue 28). DeepSpeed cuts the
experts' optimizer state per expert-parallel rank and cannot re-cut it, so such a resume is refused before launch
(exit 2, both sizes named, no byte of the run folder changed) unless `--resume-weights-only` asks for the weights
and training state alone: the experts re-split, the step, data position and lr schedule continue, the optimizer
starts fresh, said loudly and logged. Where the optimizer state can follow a world-size change (parallel.expert=1
through the universal format, ZeRO-0 as saved) it still does."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO, launch_training
from resume_helpers import checkpoint

pytestmark = pytest.mark.slow  # real trainings

MOE_TINY = REPO / "configs" / "moe-tiny.yaml"
STEPS = 6
SAVED_AT = 3  # the checkpoint the weights-only resumes start from: steps 4..6 are compared


def moe_overrides(shard_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """moe-tiny with 2 layers (4 experts, top-2, dropless), fp32, global batch 8 at 1, 2 or 4 processes, a log
    line every step, checkpoints at steps 3 and 6."""
    return [f"data.path={shard_dir}", f"run.out_dir={out_dir}", "model.n_layers=2", "precision=fp32",
            "train.micro_batch_size=2", "train.global_batch_size=8", f"train.max_steps={STEPS}",
            "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", f"checkpoint.every={SAVED_AT}",
            "checkpoint.keep_last=0", *extra]


def train(shard_dir: Path, run_dir: Path, nproc: int, *extra: str, args: tuple[str, ...] = (),
          launcher: str = "torchrun") -> subprocess.CompletedProcess:
    return launch_training(MOE_TINY, moe_overrides(shard_dir, run_dir, *extra), nproc=nproc,
                           launcher=launcher if nproc > 1 else "python", args=list(args))


def trained(shard_dir: Path, run_dir: Path, nproc: int, *extra: str) -> Path:
    proc = train(shard_dir, run_dir, nproc, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def tree_hashes(root: Path) -> dict[str, str | None]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def step_records(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in records if "loss" in r}


def events(run_dir: Path) -> list[dict]:
    return [r for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "event" in (r := json.loads(line))]


def adam_steps(ckpt: Path) -> set[int]:
    """Adam's step count of every parameter (group) in every optimizer file of a checkpoint: ZeRO shards and
    ZeRO-0's per-expert-parallel-rank files."""
    found: list[int] = []

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)
        elif key == "step" and torch.is_tensor(value):
            found.append(int(value.item()))

    for path in sorted(ckpt.glob("*_optim_states.pt")):
        walk(torch.load(path, map_location="cpu", weights_only=False), "")
    assert found, f"no Adam state in {ckpt}"
    return set(found)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, shard_dir) -> Path:
    """2 processes, the experts split over them (parallel.expert=2), ZeRO-1, 6 steps."""
    return trained(shard_dir, tmp_path_factory.mktemp("moe_resume") / "ep2", 2, "parallel.expert=2")


def assert_weights_only_resume(run_dir: Path, reference: Path, output: str, changes: list[str],
                               loss_tolerance: float = 1e-4) -> None:
    """Steps 4..6 trained from the step-3 weights, data position and lr schedule, with a fresh optimizer.
    `loss_tolerance`: of step 4's loss to the uninterrupted run's (fp32 sums in another order; bf16 rounds more)."""
    ckpt = checkpoint(run_dir, SAVED_AT)
    assert (f"warning: WEIGHTS-ONLY RESUME of {ckpt} ({'; '.join(changes)}; checkpoint.resume_weights_only): the "
            f"weights (experts re-split), step {SAVED_AT}, data position and lr schedule are loaded, the OPTIMIZER "
            f"STATE IS RESET") in output
    assert f"resumed from {ckpt} at step {SAVED_AT} (weights only, the optimizer state starts fresh" in output
    assert {"step": SAVED_AT, "event": "weights_only_resume", "checkpoint": ckpt.name,
            "changes": changes} in events(run_dir)

    ours, theirs = step_records(run_dir), step_records(reference)
    assert sorted(ours) == list(range(1, STEPS + 1)), "the step numbering continues after step 3"
    first = SAVED_AT + 1
    print(f"step {first}: loss {ours[first]['loss']:.6f} resumed vs {theirs[first]['loss']:.6f} uninterrupted; "
          f"fresh init {theirs[1]['loss']:.4f}; step {first + 1}: {ours[first + 1]['loss']:.6f} vs "
          f"{theirs[first + 1]['loss']:.6f}")
    # Step 4's loss is computed before any update from the loaded state: the step-3 weights (every expert in
    # its new place) on the batch after the saved data position give the loss the run that never stopped had.
    assert abs(ours[first]["loss"] - theirs[first]["loss"]) < loss_tolerance
    assert ours[first]["loss"] < theirs[1]["loss"] - 0.2, "far below the loss of freshly initialised weights"
    # The fresh optimizer steps from the loaded weights: the curve goes on down near the uninterrupted one (an
    # optimizer stepping from its own initial fp32 master weights would put the loss back near 7.6).
    later = range(first + 1, STEPS + 1)
    assert all(ours[s]["loss"] < ours[s - 1]["loss"] for s in later), {s: ours[s]["loss"] for s in ours}
    assert max(abs(ours[s]["loss"] - theirs[s]["loss"]) for s in later) < 0.1
    assert [ours[s]["lr"] for s in range(first, STEPS + 1)] == [theirs[s]["lr"] for s in range(first, STEPS + 1)]
    # The optimizer restarted at step 3: at step 6 Adam counts 3 steps fewer than in the run that never stopped
    # (6, or 7 where DeepSpeed's FP16_Optimizer initialises its states with a step).
    (uninterrupted,) = adam_steps(checkpoint(reference, STEPS))
    assert uninterrupted >= STEPS and adam_steps(checkpoint(run_dir, STEPS)) == {uninterrupted - SAVED_AT}
    assert json.loads((checkpoint(run_dir, STEPS) / "client_state.json").read_text())["train_state"]["step"] == STEPS


def test_resume_at_another_expert_parallel_size_is_refused_before_launch_naming_both_sizes(ep2_run, shard_dir,
                                                                                           tmp_path):
    run_dir = copy_of(ep2_run, tmp_path)
    before = tree_hashes(run_dir)
    proc = train(shard_dir, run_dir, 2, "parallel.expert=1", "train.max_steps=8", launcher="deepspeed")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert (f"config error: {checkpoint(run_dir, STEPS)} cannot be resumed with its optimizer state: "
            f"parallel.expert: 2 -> 1 (DeepSpeed cuts the experts' optimizer state per expert-parallel rank and "
            f"cannot re-cut it). Restore parallel.expert=2 on 2 processes, start a new run in its own folder "
            f"(run.out_dir={run_dir}-2), or pass --resume-weights-only (checkpoint.resume_weights_only=true)"
            ) in proc.stderr
    assert "world size" not in proc.stderr, "the world size did not change"
    assert "Traceback" not in proc.stderr and "init_process_group" not in proc.stderr + proc.stdout
    assert tree_hashes(run_dir) == before  # config.yaml, metrics.jsonl, checkpoints, latest: not a byte changed


@pytest.mark.parametrize("layout", [(), ("deepspeed.zero_stage=0", "precision=bf16")], ids=["zero1-fp32", "zero0-bf16"])
def test_weights_only_resume_at_another_expert_parallel_size_continues_from_the_weights_with_a_fresh_optimizer(
        ep2_run, shard_dir, tmp_path, layout):
    """ZeRO-1 copies the loaded weights into its fp32 partitions; under ZeRO-0 bf16 DeepSpeed's FP16_Optimizer (in
    bf16 mode) keeps fp32 master weights of its own, which must be refreshed from the loaded ones."""
    saved = trained(shard_dir, tmp_path / "saved", 2, "parallel.expert=2", *layout) if layout else ep2_run
    run_dir = copy_of(saved, tmp_path)
    proc = train(shard_dir, run_dir, 2, "parallel.expert=1", *layout,
                 args=("--resume", str(checkpoint(run_dir, SAVED_AT)), "--resume-weights-only"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_weights_only_resume(run_dir, saved, proc.stdout + proc.stderr, ["parallel.expert: 2 -> 1"],
                               loss_tolerance=1e-2 if layout else 1e-4)


def test_expert_parallel_resume_on_another_world_size_is_refused_before_launch_unless_weights_only(
        ep2_run, shard_dir, tmp_path):
    """parallel.expert=2 under ZeRO-1 on 4 processes instead of 2: the experts' ZeRO shards are cut over another
    number of expert-data-parallel ranks, which the universal conversion cannot re-cut for MoE."""
    run_dir = copy_of(ep2_run, tmp_path)
    before = tree_hashes(run_dir)
    resume = ("--resume", str(checkpoint(run_dir, SAVED_AT)))
    proc = train(shard_dir, run_dir, 4, "parallel.expert=2", args=resume, launcher="deepspeed")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert (f"config error: {checkpoint(run_dir, SAVED_AT)} cannot be resumed with its optimizer state: world size: "
            f"2 -> 4 processes (DeepSpeed cuts the experts' optimizer state per expert-parallel rank and cannot "
            f"re-cut it). Restore parallel.expert=2 on 2 processes, start a new run in its own folder "
            f"(run.out_dir={run_dir}-2), or pass --resume-weights-only") in proc.stderr
    assert "Traceback" not in proc.stderr and "init_process_group" not in proc.stderr + proc.stdout
    assert tree_hashes(run_dir) == before

    proc = train(shard_dir, run_dir, 4, "parallel.expert=2", args=(*resume, "--resume-weights-only"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (checkpoint(run_dir, SAVED_AT) / "universal").exists(), "no universal conversion was tried"
    assert_weights_only_resume(run_dir, ep2_run, proc.stdout + proc.stderr, ["world size: 2 -> 4 processes"])


@pytest.mark.parametrize(("zero", "expert", "resumed_world"), [(1, 1, 1), (0, 2, 4)])
def test_a_world_size_change_the_moe_optimizer_state_can_follow_keeps_it(shard_dir, tmp_path, zero, expert,
                                                                         resumed_world):
    """parallel.expert=1: the ZeRO shards are cut as a dense model's, the universal format re-cuts them; ZeRO-0:
    each expert-parallel rank's whole optimizer state, loaded as saved. Neither is refused nor weights-only."""
    layout = (f"deepspeed.zero_stage={zero}", f"parallel.expert={expert}")
    saved = trained(shard_dir, tmp_path / "saved", 2, *layout)
    run_dir = copy_of(saved, tmp_path)
    proc = train(shard_dir, run_dir, resumed_world, *layout, args=("--resume", str(checkpoint(run_dir, SAVED_AT))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    assert f"at step {SAVED_AT} (saved by 2 processes, re-sharded" in output and "WEIGHTS-ONLY" not in output
    ours, theirs = step_records(run_dir), step_records(saved)
    gaps = {s: abs(ours[s]["loss"] - theirs[s]["loss"]) for s in range(SAVED_AT + 1, STEPS + 1)}
    print(f"ZeRO-{zero}, parallel.expert={expert}, 2 -> {resumed_world} processes: |resumed - uninterrupted| {gaps}")
    assert max(gaps.values()) < 1e-4
    assert adam_steps(checkpoint(run_dir, STEPS)) == adam_steps(checkpoint(saved, STEPS)) == {STEPS}, \
        "Adam's state came back with the checkpoint"
