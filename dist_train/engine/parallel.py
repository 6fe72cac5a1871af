"""Tensor and sequence parallelism: which rank holds what, and the process groups DeepSpeed's engines expect.

Ranks are laid out data-parallel outermost: the `parallel.tensor x parallel.sequence` consecutive ranks
r = d*(tensor*sequence) + i form one model-parallel group (DeepSpeed's own layouts: the (data, tensor) device
mesh of AutoTP, the consecutive groups of `parallel_state_sp`), and rank r reads data-parallel shard d of the
data. ZeRO shards and all-reduces over the data-parallel ranks (TP) or over all ranks, summing over each
sequence-parallel group (SP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dist_train.config import Config, data_parallel_size


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int
    """Ranks per tensor-parallel group (parallel.tensor)."""
    sequence: int
    """Ranks per sequence-parallel group (parallel.sequence)."""
    data: int
    """Data-parallel size: world size / (tensor x sequence)."""
    rank: int
    """This process's global rank."""

    @classmethod
    def of(cls, cfg: Config, rank: int, world_size: int) -> ParallelLayout:
        return cls(tensor=cfg.parallel.tensor, sequence=cfg.parallel.sequence,
                   data=data_parallel_size(cfg, world_size), rank=rank)

    @property
    def data_rank(self) -> int:
        """Which data-parallel shard of the data this rank reads (shared by its model-parallel group)."""
        return self.rank // (self.tensor * self.sequence)

    @property
    def sequence_rank(self) -> int:
        """Which slice of each sequence this rank holds (0 without sequence parallelism)."""
        return (self.rank // self.tensor) % self.sequence

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor


def set_up_parallel(cfg: Config, model: nn.Module) -> Any:
    """Create the tensor- or sequence-parallel process groups and make `model` sequence-parallel; return the
    `mpu` for `deepspeed.initialize` (None for plain data parallelism). Passing it makes DeepSpeed count only
    data-parallel ranks in train_batch_size, and (SP) divide gradients by the data-parallel size only."""
    p = cfg.parallel
    if p.sequence > 1:
        from dist_train.model import sequence_parallel

        if cfg.model.hf_config:
            return sequence_parallel.enable_hf(model, p.sequence, cfg.train.micro_batch_size, cfg.model.seq_len)
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        parallel_state_sp.initialize_sequence_parallel(p.sequence)
        sequence_parallel.enable(model, parallel_state_sp.get_sequence_parallel_group())
        return parallel_state_sp
    if p.tensor > 1:
        # The (data, tensor) mesh AutoTP would build itself inside initialize(); built first, it can be passed
        # as the mpu so that DeepSpeed's batch-size check counts data-parallel ranks only.
        from deepspeed.utils import groups

        groups._init_tp_mesh_device(tensor_model_parallel_size=p.tensor)
        return groups
    return None
