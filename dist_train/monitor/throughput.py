"""Throughput and peaks: per-rank forward tokens/s (a straggler shows here, not in step times, which end in an
all-reduce) and the accelerator's peak FLOP/s for MFU. `gather_rank_throughput` is a collective: every rank
calls it at the same log step.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from dist_train.distributed.collectives import all_gather_objects


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

    # The hooks run eagerly under train.compile (engine.compile() compiles the module's call, hooks included):
    # traced, each pass's clock reading became a guard and recompiled them up to dynamo's limit of 8, and a CUDA
    # event recorded inside a graph does not mark the pass's start and end.
    @torch.compiler.disable
    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._open = self._now() if module.training else None  # evaluation is not training throughput

    @torch.compiler.disable
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


@dataclass(frozen=True)
class Peak:
    """Dense (no 2:4 sparsity) peak TFLOP/s of one device as torch sees it, per math mode, from the vendors'
    data sheets (sparse figures halved). None: the device has no such mode."""

    half: float | None
    """bf16 and fp16 tensor cores (fp32 accumulation; GeForce cards run that at half their fp16-accumulate rate)."""
    tf32: float | None
    """fp32 matmuls on TF32 tensor cores (torch.set_float32_matmul_precision("high"))."""
    fp32: float | None
    """Plain fp32 (vector units, or AMD's fp32 matrix cores)."""


# Keyed by the words of `torch.cuda.get_device_name()` that identify the model; a key matches whole words
# only ("L4" is not "L40", "H200" not "GH200") and the key with the most words wins ("H100 NVL" over "H100").
PEAKS: dict[str, Peak] = {
    "H100": Peak(half=989.4, tf32=494.7, fp32=66.9),  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": Peak(half=756.0, tf32=378.0, fp32=51.2),
    "H100 NVL": Peak(half=835.0, tf32=417.5, fp32=60.0),
    "H200": Peak(half=989.4, tf32=494.7, fp32=66.9),  # SXM
    "H200 NVL": Peak(half=835.0, tf32=417.5, fp32=60.0),
    "GH200": Peak(half=989.4, tf32=494.7, fp32=66.9),
    "B200": Peak(half=2250.0, tf32=1100.0, fp32=None),
    "A100": Peak(half=312.0, tf32=156.0, fp32=19.5),
    "A800": Peak(half=312.0, tf32=156.0, fp32=19.5),
    "L40S": Peak(half=362.05, tf32=183.0, fp32=91.6),
    "L40": Peak(half=181.05, tf32=90.5, fp32=90.5),
    "L4": Peak(half=121.0, tf32=60.0, fp32=30.3),
    "A10": Peak(half=125.0, tf32=62.5, fp32=31.2),  # not AWS's A10G, which has no published data sheet
    "V100": Peak(half=125.0, tf32=None, fp32=15.7),  # fp16 only: V100 has no bf16
    "RTX 4090": Peak(half=165.2, tf32=82.6, fp32=82.6),
    "RTX 3090": Peak(half=71.0, tf32=35.6, fp32=35.6),
    "MI300X": Peak(half=1307.4, tf32=653.7, fp32=163.4),
    # An MI250X or MI250 is two GCDs, and torch shows each GCD as one device: half the card's 383 (362).
    "MI250X": Peak(half=191.5, tf32=None, fp32=47.9),
    "MI250": Peak(half=181.0, tf32=None, fp32=45.3),
}

MATH_MODES = ("half", "tf32", "fp32")


def _words(name: str) -> list[str]:
    return re.split(r"[\s\-/_]+", name.strip())


def device_peak(name: str) -> Peak | None:
    """The PEAKS entry of a device name, matching whole words; None for a device not in the table."""
    words = _words(name)
    best: tuple[int, Peak] | None = None
    for key, peak in PEAKS.items():
        k = _words(key)
        found = any(words[i:i + len(k)] == k for i in range(len(words) - len(k) + 1))
        if found and (best is None or len(k) > best[0]):
            best = (len(k), peak)
    return best[1] if best else None


def math_mode(precision: str) -> str:
    """The math the matmuls of a run use: 16-bit tensor cores, TF32 (fp32 with torch allowed to use it) or
    fp32. Read from torch's setting at the time of the call, so call it after the run's TF32 choice is made."""
    if precision in ("bf16", "fp16"):
        return "half"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


def peak_flops(device: torch.device | str, mode: str = "half") -> float | None:
    """Peak FLOP/s of one accelerator in math `mode` (see `math_mode`), for MFU; None on the CPU, on a GPU
    missing from PEAKS, or in a mode the device lacks."""
    device = torch.device(device)
    if mode not in MATH_MODES:
        raise ValueError(f"mode must be one of {MATH_MODES}, got {mode!r}")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    peak = device_peak(torch.cuda.get_device_name(device))
    tflops = getattr(peak, mode) if peak else None
    return tflops * 1e12 if tflops else None
