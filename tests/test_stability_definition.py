"""What bench/stability.py calls an unstable run, on loss curves written as the trainer writes metrics.jsonl: a blow-up
during the warmup counts though the trainer's spike detector cannot see it yet, a blip of 1-2 steps does not."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from distributed_helpers import REPO

_spec = importlib.util.spec_from_file_location("stability", REPO / "bench" / "stability.py")
stability = importlib.util.module_from_spec(_spec)
sys.modules["stability"] = stability  # its dataclass looks its module up
_spec.loader.exec_module(stability)

FIRST = 7.6  # ~ln 2048: the untrained tiny model's loss
TRAINING = [FIRST - 0.05 * i for i in range(30)] + [6.0 + 0.01 * (i % 3) for i in range(30)]
"""60 steps of a healthy run: down from 7.6 to 6.15, then flat near 6."""


def judged(tmp_path: Path, values: list[float | None]) -> stability.Outcome:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v}) + "\n"
                                                    for i, v in enumerate(values, 1)))
    return stability.judge("baseline", 0.1, 1, tmp_path, 0)


def with_losses(changes: dict[int, float | None]) -> list[float | None]:
    return [changes.get(step, v) for step, v in enumerate(TRAINING, 1)]


def test_a_healthy_run_is_stable(tmp_path):
    outcome = judged(tmp_path, TRAINING)
    assert not outcome.unstable and outcome.reason == "" and outcome.detector_spikes == 0
    assert math.isclose(outcome.final_loss, sum(TRAINING[-10:]) / 10)


def test_a_blow_up_in_the_warmup_is_unstable_though_the_detector_sees_nothing(tmp_path):
    outcome = judged(tmp_path, with_losses({6: 9.0, 7: 11.0, 8: 10.0}))
    assert outcome.unstable and outcome.reason == "above the first loss + 1 from step 6"
    assert outcome.detector_spikes == 0 and outcome.max_loss == 11.0


def test_two_steps_above_the_first_loss_are_a_blip(tmp_path):
    outcome = judged(tmp_path, with_losses({6: 9.0, 7: 11.0}))
    assert not outcome.unstable and outcome.max_loss == 11.0


def test_three_steps_above_the_rolling_mean_after_the_warmup_are_a_spike(tmp_path):
    outcome = judged(tmp_path, with_losses({40: 7.5, 41: 7.4, 42: 7.3}))
    assert outcome.unstable and outcome.reason == "spike at step 40" and outcome.detector_spikes == 1
    assert math.isclose(outcome.max_jump, 7.5 - sum(TRAINING[19:39]) / 20)


def test_a_non_finite_loss_or_a_loss_that_climbs_and_stays_up_is_unstable(tmp_path):
    assert judged(tmp_path, with_losses({50: None})).reason == "non-finite loss at step 50"
    climbing = TRAINING[:30] + [TRAINING[29] + 0.05 * i for i in range(1, 31)]  # +1.5 nats, the mean follows
    outcome = judged(tmp_path, climbing)
    assert outcome.unstable and outcome.detector_spikes == 0 and outcome.reason.startswith("climbed to")
