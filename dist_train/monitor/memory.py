"""Accelerator memory as the training log reports it, in GiB (2**30 bytes, as `scaling memory` prints it).
"""

from __future__ import annotations

import resource

import torch

GIB = 2**30


def window_memory_gib(device: torch.device) -> dict[str, float | None]:
    """`mem_gib` and `mem_reserved_gib` of one log line.

    On a GPU: the peaks of memory allocated by tensors and of memory reserved by torch's caching allocator
    (allocated plus its cache: what the device really gives up) since the previous call, whose peaks are then
    reset, so each log line shows its own window. On the CPU: the process's peak resident memory since it
    started (the kernel keeps no other peak), and no reserved figure."""
    if device.type == "cuda":
        out: dict[str, float | None] = {"mem_gib": torch.cuda.max_memory_allocated(device) / GIB,
                                        "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    return {"mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,  # ru_maxrss: KiB
            "mem_reserved_gib": None}
