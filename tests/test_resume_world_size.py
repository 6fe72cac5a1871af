"""Resume on another number of processes (2 -> 1 and 1 -> 2, ZeRO 2 and 3) at the same global batch: the loss
curve continues the uninterrupted one and Adam's moments come back re-sharded, not reinitialised."""

from __future__ import annotations

import pytest
import torch
from resume_helpers import (
    STEPS,
    checkpoint,
    command,
    losses,
    optimizer_tensors,
    overrides,
    run,
    shared_run,
    tail,
)

from dist_train.checkpoint.weights import checkpoint_weights

pytestmark = pytest.mark.slow

RESUME_AT = 2  # resume from the step-2 checkpoint: steps 3..6 are compared


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize(("saved_world", "resumed_world"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_curve_with_the_optimizer_state(
        tmp_path_factory, shard_dir, tmp_path, stage, saved_world, resumed_world):
    zero = f"deepspeed.zero_stage={stage}"
    saved = shared_run(tmp_path_factory, shard_dir, f"zero{stage}_x{saved_world}", saved_world, zero)
    # The uninterrupted run at the new world size: same shard layout, so the optimizer shards compare 1:1.
    target = shared_run(tmp_path_factory, shard_dir, f"zero{stage}_x{resumed_world}", resumed_world, zero)

    log = tmp_path / "train.log"
    cmd = command(overrides(shard_dir, tmp_path, zero), resumed_world,
                  args=("--resume", str(checkpoint(saved, RESUME_AT))))
    assert run(cmd, log) == 0, tail(log)
    text = log.read_text()
    assert f"at step {RESUME_AT} (saved by {saved_world} processes, re-sharded via the universal format)" in text
    assert (checkpoint(saved, RESUME_AT) / "universal" / "zero").is_dir()

    resumed, uninterrupted = losses(tmp_path), losses(saved)
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
    gaps = {s: abs(resumed[s] - uninterrupted[s]) for s in resumed}
    print(f"ZeRO-{stage} {saved_world}->{resumed_world}: |resumed - uninterrupted| per step {gaps}")
    assert max(gaps.values()) < 1e-4

    # Adam's moments: the resumed run's final shards against those of the run that never stopped. Had they been
    # reinitialised at step 2, exp_avg_sq would hold 4 steps of history instead of 6 (tens of % apart).
    mine, theirs = optimizer_tensors(checkpoint(tmp_path, STEPS)), optimizer_tensors(checkpoint(target, STEPS))
    assert mine.keys() == theirs.keys()
    steps = {k: v.item() for k, v in mine.items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {STEPS}, f"Adam step counts {steps}"
    moments = {k: relative_error(mine[k], theirs[k]) for k in mine if k.endswith(("exp_avg", "exp_avg_sq"))}
    print(f"largest relative error of an Adam moment: {max(moments.values()):.2e} over {len(moments)} tensors")
    assert moments and max(moments.values()) < 1e-3

    a, b = checkpoint_weights(checkpoint(tmp_path, STEPS)), checkpoint_weights(checkpoint(target, STEPS))
    gap = max((a.get(n) - b.get(n)).abs().max().item() for n in a.names)
    print(f"largest weight difference to the uninterrupted {resumed_world}-process run: {gap:.2e}")
    assert gap < 1e-5
