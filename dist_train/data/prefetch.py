"""Read the next training batches in a background thread while the model computes (`data.num_workers`).

The loader's position must be saved as of the last batch the *trainer* took, not the last one read ahead, or a
resumed run would skip the read-ahead batches: every queued batch carries the loader state just after it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from dist_train.data.build import Loader


class Prefetcher:
    """Wraps a loader (TokenLoader or SpanCorruptionLoader, already positioned) with `depth` batches read ahead
    by one thread."""

    def __init__(self, loader: Loader, depth: int, pin_memory: bool = False):
        self.loader = loader
        self.pin_memory = pin_memory
        self._state = loader.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        threading.Thread(target=self._read_ahead, name="batch-prefetch", daemon=True).start()

    def _read_ahead(self) -> None:
        while True:
            try:
                batch = self.loader.next_batch()
                if self.pin_memory:  # page-locked host memory: the copy to the GPU can overlap compute
                    batch = tuple(t.pin_memory() for t in batch)
                self._queue.put((batch, self.loader.state_dict()))
            except BaseException as e:  # hand any failure (a damaged shard) to the training loop
                self._queue.put(e)
                return

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state
