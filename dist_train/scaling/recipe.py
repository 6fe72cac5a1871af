"""Training settings for a planned model: batch size, learning rate and warmup from published laws, and the
micro-batch, ZeRO stage and recomputation that the memory estimate (`dist_train.scaling.memory`) says fit
the GPUs. Every choice carries the sentence that says where it came from; `plan --write-config` prints them
and writes them as comments into the config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dist_train.config import Config, config_from_dict
from dist_train.scaling.memory import estimate_memory

GIB = 2**30

MEMORY_HEADROOM = 0.10
"""Fraction of the GPU left free: the estimate leaves out the CUDA context and allocator fragmentation
(together ~1-5 GiB on an 80 GiB GPU)."""

ZERO_STAGES = (1, 2, 3)
"""Tried in this order: ZeRO-1 and -2 add no communication over data parallelism's, ZeRO-3 gathers every
layer's weights in forward and backward."""
MOE_ZERO_STAGES = (1, 2)
"""An MoE model's: DeepSpeed's MoE layer does not run under ZeRO-3 (config validation refuses it)."""

# DeepSeek LLM (Bi et al. 2024, section 3.1, eq. 1): compute-optimal hyperparameters fitted on runs from 1e17 to
# 2e19 FLOPs, C in FLOPs (their M·D: non-embedding FLOPs per token, attention included, times tokens).
DEEPSEEK_LR = (0.3118, -0.1250)
DEEPSEEK_BATCH_TOKENS = (0.2920, 0.3271)
GPT3_WARMUP_TOKENS = 375_000_000
"""GPT-3 (Brown et al. 2020, appendix B): linear warmup over the first 375 million tokens, at every size."""
MIN_LR_FRACTION = 0.1
"""GPT-3 (appendix B) and Chinchilla (Hoffmann et al. 2022, section 4) decay the lr by 10x over the run."""


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB)?\s*", text)
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 80GiB, 80GB or 40 (GiB)")
    scale = {"GiB": GIB, "GB": 10**9, "MiB": 2**20, "MB": 10**6, None: GIB}[m.group(2)]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Recipe:
    """The settings chosen for one run, each with where it came from."""

    global_batch: int
    """Sequences per optimizer step."""
    micro_batch: int
    zero_stage: int
    grad_checkpointing: bool
    lr: float
    min_lr: float
    warmup_steps: int
    peak_bytes: int
    """The memory estimate's peak per GPU with these settings."""
    budget_bytes: int
    notes: dict[str, str]
    """Setting -> the sentence that says where its value came from."""


def batch_and_lr(compute: float) -> tuple[float, float, dict[str, str]]:
    """(batch in tokens, lr, notes) for a run of `compute` FLOPs."""
    a, b = DEEPSEEK_BATCH_TOKENS
    batch_tokens = a * compute**b
    a, b = DEEPSEEK_LR
    lr = a * compute**b
    notes = {
        "train.lr": f"{lr:.2e}: DeepSeek LLM (Bi et al. 2024, eq. 1) eta_opt = 0.3118·C^-0.1250 at C = {compute:.2e}",
        "train.min_lr": "lr/10: GPT-3 (Brown et al. 2020, app. B) and Chinchilla decay the lr 10x by the end",
    }
    return batch_tokens, lr, notes


def _with(cfg: Config, micro: int, stage: int, recompute: bool) -> Config:
    tree = cfg.to_dict()
    tree["train"]["micro_batch_size"] = micro
    tree["deepspeed"]["zero_stage"] = stage
    tree["model"]["grad_checkpointing"] = recompute
    return config_from_dict(tree)


def fit_memory(cfg: Config, gpus: int, per_gpu_batch: int, budget_bytes: int) -> tuple[Config, int, str]:
    """The first setting that fits `budget_bytes` less the headroom: ZeRO-1, -2, -3 (an MoE model: -1, -2)
    without recomputation, then with; at each, the largest power-of-two micro-batch up to `per_gpu_batch`
    (fewer, larger micro-batches run faster). Returns the config, its estimated peak and the note that says so."""
    usable = int(budget_bytes * (1 - MEMORY_HEADROOM))
    micros = [2**k for k in range(int(math.log2(max(1, per_gpu_batch))), -1, -1)]
    stages = MOE_ZERO_STAGES if cfg.model.moe.enabled else ZERO_STAGES
    for recompute in (False, True):
        for stage in stages:
            for micro in micros:
                trial = _with(cfg, micro, stage, recompute)
                peak = estimate_memory(trial, gpus).peak(recompute)
                if peak <= usable:
                    note = (f"micro-batch {micro}, ZeRO-{stage}, recomputation {'on' if recompute else 'off'}: "
                            f"the memory estimate's peak is {peak / GIB:.1f} GiB per GPU, within "
                            f"{budget_bytes / GIB:.0f} GiB less {MEMORY_HEADROOM:.0%} headroom (first fit of "
                            f"ZeRO-{'/'.join(map(str, stages))} without, then with recomputation; largest micro-batch "
                            f"first)")
                    return trial, peak, note
    smallest = estimate_memory(_with(cfg, 1, stages[-1], True), gpus).peak(True)
    moe, expert = cfg.model.moe, cfg.parallel.expert
    experts = (f", a larger parallel.expert (now {expert}: each GPU holds {moe.num_experts // expert} of the "
               f"{moe.num_experts} experts of each MoE layer)" if moe.enabled and expert < moe.num_experts else "")
    raise ValueError(f"the planned model does not fit {budget_bytes / GIB:.0f} GiB per GPU even at ZeRO-{stages[-1]} "
                     f"with recomputation and micro-batch 1 (estimated peak {smallest / GIB:.1f} GiB): use more GPUs "
                     f"(--gpus){experts}, GPUs with more memory, or a smaller budget")


def recipe(cfg: Config, compute: float, tokens: int, gpus: int, budget_bytes: int) -> tuple[Config, Recipe]:
    """`cfg` (already the planned shape and precision) with batch, lr, warmup, micro-batch, ZeRO stage,
    recomputation and steps chosen for a run of `compute` FLOPs over `tokens` on `gpus` GPUs of
    `budget_bytes` each."""
    seq_len = cfg.model.seq_len
    batch_tokens, lr, notes = batch_and_lr(compute)
    per_gpu = max(1, round(batch_tokens / seq_len / gpus))
    fitted, peak, notes["memory fit"] = fit_memory(cfg, gpus, per_gpu, budget_bytes)
    micro = fitted.train.micro_batch_size
    global_batch = gpus * micro * max(1, round(per_gpu / micro))  # whole micro-batches on every GPU
    notes["train.global_batch_size"] = (
        f"{global_batch} sequences of {seq_len} = {global_batch * seq_len / 1e6:.2f}M tokens: DeepSeek LLM "
        f"(Bi et al. 2024, eq. 1) B_opt = 0.2920·C^0.3271 = {batch_tokens / 1e6:.2f}M tokens, rounded to whole "
        f"micro-batches on {gpus} GPUs")
    tokens_per_step = global_batch * seq_len
    max_steps = max(1, math.ceil(tokens / tokens_per_step))
    warmup = min(max_steps, max(1, round(GPT3_WARMUP_TOKENS / tokens_per_step)))
    notes["train.warmup_steps"] = (f"{warmup}: GPT-3 (Brown et al. 2020, app. B) warms up linearly over the first 375M "
                             f"tokens, {tokens_per_step / 1e6:.2f}M tokens per step here")
    tree = fitted.to_dict()
    tree["train"].update(global_batch_size=global_batch, grad_accum_steps=1, lr=lr, min_lr=lr * MIN_LR_FRACTION,
                         warmup_steps=warmup, max_steps=max_steps)
    out = config_from_dict(tree)
    return out, Recipe(global_batch=global_batch, micro_batch=micro, zero_stage=out.deepspeed.zero_stage,
                       grad_checkpointing=out.model.grad_checkpointing, lr=lr, min_lr=lr * MIN_LR_FRACTION,
                       warmup_steps=warmup, peak_bytes=peak, budget_bytes=budget_bytes, notes=notes)
