"""Accelerator memory as the training log reports it.
"""

from __future__ import annotations

import resource

import torch


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
