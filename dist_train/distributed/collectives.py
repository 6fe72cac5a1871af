"""Small collectives over all ranks (sums, means, gathered objects); without a process group each is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dist_train.distributed.process_group import use_cuda


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a small tensor over all ranks (returned on the CPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = values.to(_collective_device())
    dist.all_reduce(t)
    return t.cpu()


def mean_over_ranks(value: float) -> float:
    return sum_over_ranks(torch.tensor([value], dtype=torch.float64)).item() / world_size()
