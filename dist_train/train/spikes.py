"""Loss-spike detection, for the rollback PaLM did by hand (Chowdhery et al. 2022, section 5.1: "restart training
from a checkpoint roughly 100 steps before the spike started, and skip roughly 200-500 data batches").

A spike is `train.spike_steps` consecutive finite losses each more than `train.spike_margin` (nats) above the
mean of the `train.spike_window` losses before them. The mean only takes normal steps: suspect ones join it
when a normal step shows they were a blip. Nothing is detected until the window is full (after a start or a
resume; the window is not saved). Every rank sees the same all-reduced loss, so every rank decides alike,
without a collective.

The rollback itself (`Run.roll_back` in the trainer): the newest checkpoint before the spike's first step is
loaded (weights, optimizer, scheduler, RNG, step counter), but the data loader keeps its position, so the global
samples read between that checkpoint and the detection are skipped, never trained on again.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Spike:
    first_step: int
    """The first step above the threshold."""
    last_step: int
    """The step at which the spike was confirmed."""
    losses: list[float]
    """The losses of first_step..last_step."""
    baseline: float
    """The rolling mean they were compared with."""


@dataclass
class SpikeDetector:
    window: int
    """Losses in the rolling mean."""
    margin: float
    """Nats above the mean that make a step suspect."""
    patience: int
    """Suspect steps in a row that make a spike."""
    _normal: deque[tuple[int, float]] = field(init=False)
    _suspect: list[tuple[int, float]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._normal = deque(maxlen=self.window)

    @property
    def suspect(self) -> bool:
        """A spike may be starting: a checkpoint saved now could hold it (the trainer then waits)."""
        return bool(self._suspect)

    def observe(self, step: int, loss: float) -> Spike | None:
        """Take one step's loss (skipped, non-finite steps are not passed here); return a confirmed spike."""
        if not math.isfinite(loss):
            return None
        if len(self._normal) == self.window:
            baseline = sum(value for _, value in self._normal) / self.window
            if loss > baseline + self.margin:
                self._suspect.append((step, loss))
                if len(self._suspect) < self.patience:
                    return None
                spike = Spike(self._suspect[0][0], step, [value for _, value in self._suspect], baseline)
                self._suspect = []
                return spike
        self._normal.extend(self._suspect)  # a blip after all: its steps were real training
        self._suspect = []
        self._normal.append((step, loss))
        return None

    def rewind(self, step: int) -> None:
        """The run went back to `step`: forget the losses after it."""
        kept = [(s, value) for s, value in self._normal if s <= step]
        self._normal = deque(kept, maxlen=self.window)
        self._suspect = []
