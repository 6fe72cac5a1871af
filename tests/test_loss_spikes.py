"""Loss spikes: detection (dist_train/train/spikes.py) and the automatic rollback that skips the spike's data, on a
real spike provoked by random tokens at a known place in the data (bench/loss_spike.py makes the data and plots
the same experiment against a run without rollback: docs/loss_spike_rollback.png)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from distributed_helpers import REPO, launch_training
from resume_helpers import TINY, losses

from dist_train.checkpoint.client_file import load_client_file
from dist_train.monitor import wandb_reader
from dist_train.train.spikes import SpikeDetector

_spec = importlib.util.spec_from_file_location("loss_spike", REPO / "bench" / "loss_spike.py")
loss_spike = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loss_spike)


def feed(detector: SpikeDetector, values: list[float], first_step: int = 1) -> list:
    return [detector.observe(step, v) for step, v in enumerate(values, first_step)]


def test_a_spike_is_confirmed_after_spike_steps_losses_above_the_rolling_mean_by_the_margin():
    detector = SpikeDetector(window=4, margin=1.0, patience=2)
    assert feed(detector, [9.0, 9.0, 9.0]) == [None] * 3
    assert detector.observe(4, 20.0) is None and not detector.suspect, "nothing is judged before the window fills"
    detector = SpikeDetector(window=4, margin=1.0, patience=2)
    feed(detector, [5.0, 5.0, 5.0, 5.0])
    assert detector.observe(5, 6.5) is None and detector.suspect
    spike = detector.observe(6, 6.2)
    assert (spike.first_step, spike.last_step, spike.losses, spike.baseline) == (5, 6, [6.5, 6.2], 5.0)
    assert not detector.suspect


def test_one_step_above_the_margin_is_a_blip_that_joins_the_mean():
    detector = SpikeDetector(window=4, margin=1.0, patience=2)
    feed(detector, [5.0, 5.0, 5.0, 5.0])
    assert feed(detector, [6.5, 5.0], first_step=5) == [None, None]
    # the mean is now (5 + 5 + 6.5 + 5) / 4 = 5.375: 6.3 is within the margin, 6.5 is not
    assert feed(detector, [6.3, 6.3], first_step=7) == [None, None] and not detector.suspect
    assert detector.observe(9, float("nan")) is None, "non-finite losses are the skipped-step counter's job"


def test_rewinding_forgets_the_losses_after_the_rollback_step():
    detector = SpikeDetector(window=3, margin=1.0, patience=2)
    feed(detector, [5.0, 5.0, 5.0, 2.0, 2.0])
    detector.observe(6, 9.0)
    assert detector.suspect
    detector.rewind(3)  # of the window (steps 3-5) step 3 stays; the suspect step 6 is gone
    assert not detector.suspect
    assert feed(detector, [5.5, 6.1], first_step=4) == [None, None] and not detector.suspect, "refilling"
    assert detector.observe(6, 7.0) is None and detector.suspect  # mean of 5.0, 5.5, 6.1 = 5.53


@pytest.mark.slow
def test_a_garbage_data_spike_is_rolled_back_and_exactly_its_batches_are_skipped(shard_dir, tmp_path):
    """Random tokens in the global samples of steps 26-27 (bench/loss_spike.py). The run (2 processes, ZeRO 1, a
    checkpoint every 5 steps) sees the spike, confirms it at step 27, goes back to step 25 and skips samples
    [200, 216) - the garbage, no more, no less - then trains to step 36 below the spike, logged in metrics.jsonl
    and W&B."""
    data = tmp_path / "garbage_shards"
    where = loss_spike.garbage_copy(shard_dir, data, loss_spike.GARBAGE)
    print(f"random tokens in samples {loss_spike.GARBAGE} at (shard, token offset) {where[:3]}...")
    run_dir = tmp_path / "run"
    proc = launch_training(TINY, [*loss_spike.overrides(data, run_dir, rollback=True), "wandb.enabled=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if "event" in r]
    print(events)
    assert len(events) == 1
    event = events[0]
    assert {k: event[k] for k in ("step", "event", "rolled_back", "spike_first_step", "spike_last_step",
                                  "rolled_back_to_step", "steps_undone", "skipped_batches", "rollbacks")} == {
        "step": 25, "event": "loss_spike", "rolled_back": True, "spike_first_step": 26, "spike_last_step": 27,
        "rolled_back_to_step": 25, "steps_undone": 2, "skipped_batches": 2, "rollbacks": 1}
    skipped = range(event["skipped_samples_from"], event["skipped_samples_to"])
    assert skipped == loss_spike.GARBAGE, "exactly the garbage samples are skipped"
    assert min(event["spike_losses"]) > event["baseline_loss"] + 1.0, "the run did spike before the rollback"
    assert ("LOSS SPIKE at steps 26-27" in proc.stdout and
            "rolled back to step 25 (rollback 1 of 1), skipping 2 batches = global samples [200, 216)" in proc.stdout)

    trained = losses(run_dir)  # each step once: the undone steps 26-27 were logged again after the rollback
    assert sorted(trained) == list(range(1, loss_spike.MAX_STEPS + 1))
    after = [trained[s] for s in range(26, loss_spike.MAX_STEPS + 1)]
    print(f"losses after the rollback: {[round(x, 3) for x in after]}; spike {event['spike_losses']}")
    assert max(after) < event["baseline_loss"] + 1.0 < min(event["spike_losses"])

    final = run_dir / "checkpoints" / f"step_{loss_spike.MAX_STEPS:08d}"
    client = load_client_file(final / "client_rank00000.pt")
    assert client["loader"]["consumed_samples"] == loss_spike.MAX_STEPS * loss_spike.GLOBAL_BATCH + len(skipped)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollbacks"] == 1 and summary["final_step"] == loss_spike.MAX_STEPS

    rows = [row for row in wandb_reader.read_history(run_dir) if "loss_spike/count" in row]
    assert [(row["_step"], row["loss_spike/rolled_back_to_step"], row["loss_spike/skipped_batches"])
            for row in rows] == [(27, 25, 2)]
