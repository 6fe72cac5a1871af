"""Micro-batches under tensor and sequence parallelism.

The ranks of one tensor-parallel group compute one micro-batch together, so they read the same one: the
loader is built for the data-parallel rank and size, not the global ones. The ranks of one sequence-parallel
group also read the same sequences, and each keeps its contiguous slice of T/P tokens (inputs and targets).
The loader's saved position stays global (`TokenLoader.state_dict`).
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train.data.loader import TokenLoader


class SequenceSlices:
    """Wraps a TokenLoader: slice `rank` of `size` equal contiguous slices of every sequence."""

    def __init__(self, loader: TokenLoader, rank: int, size: int):
        if loader.seq_len % size:
            raise ValueError(f"seq_len {loader.seq_len} is not divisible by the sequence-parallel size {size}")
        self.loader, self.rank, self.size = loader, rank, size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.loader.next_batch()  # (B, T) each
        width = inputs.shape[1] // self.size
        part = slice(self.rank * width, (self.rank + 1) * width)
        return inputs[:, part].contiguous(), targets[:, part].contiguous()  # (B, T/P) each

    def reset(self) -> None:
        self.loader.reset()

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.loader.load_state_dict(state, strict)


def rank_batches(sources: list[tuple[str, float]], split: str, seq_len: int, micro_batch_size: int, seed: int,
                 data_rank: int, data_size: int, sequence_rank: int = 0,
                 sequence_size: int = 1) -> TokenLoader | SequenceSlices:
    """This rank's micro-batches: data-parallel shard `data_rank` of `data_size`, sliced when sequence-parallel."""
    loader = TokenLoader(sources, split, seq_len, micro_batch_size, data_rank, data_size, seed)
    return SequenceSlices(loader, sequence_rank, sequence_size) if sequence_size > 1 else loader
