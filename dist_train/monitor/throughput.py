"""Throughput and peaks: per-rank forward tokens/s (a straggler shows here, not in step times, which end in an
all-reduce) and the accelerator's peak FLOP/s for MFU. `gather_rank_throughput` is a collective: every rank
calls it at the same log step.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from dist_train.distributed.collectives import all_gather_objects

if TYPE_CHECKING:
    pass


PER_RANK_KEYS_MAX_WORLD = 64
"""Up to this many ranks, each rank's throughput is its own metric; beyond, only min/max/slowest rank
(thousands of per-rank series would drown the W&B workspace)."""


class ForwardTimer:
    """Wall time of this rank's training forward passes, measured with hooks on the model.

    Why the forward pass: a data-parallel step ends in collectives, so every rank's *step* time is the slowest
    rank's; a forward pass (ZeRO 0-2) runs no collective, so its time is this rank's own speed and a
    straggler shows up. CUDA events time the GPU work without synchronizing each pass."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self._cuda = device.type == "cuda"
        self._open: Any = None
        self._pairs: list[tuple[Any, Any]] = []
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _now(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._open = self._now() if module.training else None  # evaluation is not training throughput

    def _stop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._open is not None:
            self._pairs.append((self._open, self._now()))
            self._open = None

    def take(self) -> tuple[float, int]:
        """(seconds, forward passes) since the last call."""
        pairs, self._pairs = self._pairs, []
        if self._cuda:
            if pairs:
                pairs[-1][1].synchronize()
            return sum(a.elapsed_time(b) for a, b in pairs) / 1e3, len(pairs)  # elapsed_time is in ms
        return sum(b - a for a, b in pairs), len(pairs)


def gather_rank_throughput(timer: ForwardTimer, tokens_per_forward: int) -> dict[str, Any]:
    """Each rank's forward throughput (tokens/s) gathered to every rank: min, max, the slowest rank and, up to
    PER_RANK_KEYS_MAX_WORLD ranks, one `fwd_tokens_per_s/rank_R` per rank. A collective: every rank calls it
    at the same step."""
    seconds, passes = timer.take()
    local = passes * tokens_per_forward / seconds if seconds > 0 else math.nan
    per_rank = [float(v) for v in all_gather_objects(local)]
    finite = [(v, r) for r, v in enumerate(per_rank) if math.isfinite(v)]
    if not finite:
        return {}
    slowest, slowest_rank = min(finite)
    record: dict[str, Any] = {"fwd_tokens_per_s_min": slowest, "fwd_tokens_per_s_max": max(finite)[0],
                              "slowest_rank": slowest_rank}
    if len(per_rank) <= PER_RANK_KEYS_MAX_WORLD:
        record.update({f"fwd_tokens_per_s/rank_{r}": v for r, v in enumerate(per_rank)})
    return record


# Dense (no 2:4 sparsity) tensor-core peak in TFLOP/s for bf16 from the vendors' data sheets. Matched by
# substring of `torch.cuda.get_device_name()`, first match wins: more specific names come first.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16 (V100 has no bf16)
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def peak_flops(device: torch.device | str) -> float | None:
    """Peak bf16 FLOP/s of one accelerator, for MFU; None on the CPU or on a GPU missing from PEAK_TFLOPS."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
