"""AdamW with parameter groups and the learning-rate schedules (warmup + cosine, WSD, constant).

Clipping and accumulation are DeepSpeed's (`gradient_clipping`, `gradient_accumulation_steps` in the
generated ds_config); the optimizer here is a client `torch.optim.AdamW`, which needs no JIT-compiled op, or,
when the optimizer is offloaded to the CPU, DeepSpeed's `DeepSpeedCPUAdam` (vectorised C++ Adam; its op is
JIT-built once, ~47 s, into TORCH_EXTENSIONS_DIR): torch's AdamW on the host is several times slower there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dist_train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weight matrices of the blocks and of an untied output head; leave norms, biases, LayerScale
    gains (ndim < 2) and embedding tables (input embedding, learned positions, and so a tied head) undecayed.

    Norm gains and biases are scales and offsets, not capacity: pulling them toward zero does not regularise.
    Embedding rows are updated only when their token occurs, so decay shrinks rare tokens' rows at every step
    while their gradients arrive seldom (OLMo 2 stopped decaying embeddings, citing training stability).
    nanoGPT does not follow this: it decays every tensor with ndim >= 2, embeddings included; GPT-NeoX and
    Megatron exclude only norms and biases. With a tied head the shared table is treated as an embedding."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3-partitioned parameter is flat: use its real shape
        (no_decay if ndim < 2 or id(p) in embedding_params else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if any(getattr(p, "allreduce", True) is False for p in decay + no_decay):
        # Expert weights (DeepSpeed MoE) in groups of their own, which ZeRO reduces over the expert-data-parallel
        # ranks (those holding the same experts) instead of all data-parallel ranks.
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        for group, name in zip(groups, ("decay", "no_decay")):
            group["name"] = name
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


class Skippable:
    """An optimizer whose next step can be skipped (a non-finite loss): DeepSpeed's ZeRO wrappers call the inner
    optimizer's `step()`, so skipping here leaves weights and moments untouched at every ZeRO stage."""

    skip_next_step: bool = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        # The flag stays set for the whole optimizer step: ZeRO calls step() once per parameter (sub-)group.
        # The trainer clears it after engine.step().
        if self.skip_next_step:
            return None
        return super().step(closure)  # type: ignore[misc]


class SkippableAdamW(Skippable, torch.optim.AdamW):
    """torch's AdamW (fused on CUDA), skippable."""


def _cpu_adam_class() -> type:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its op on first use: only when offloading

    class SkippableCPUAdam(Skippable, DeepSpeedCPUAdam):
        """DeepSpeed's CPU Adam (AdamW mode) for an offloaded optimizer, skippable."""

    return SkippableCPUAdam


def build_optimizer(model: nn.Module, t: TrainConfig, fused: bool = False,
                    offloaded: bool = False) -> Skippable:
    """AdamW over `param_groups`; `offloaded`: DeepSpeedCPUAdam, which runs the step on the host where ZeRO
    keeps the states."""
    groups = param_groups(model, t.weight_decay)
    if offloaded:
        return _cpu_adam_class()(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, adamw_mode=True)
    return SkippableAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "cosine":
        span = max(1, t.max_steps - t.warmup_steps - 1)  # the last step (max_steps - 1) runs at min_lr
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    # wsd: warmup, a long stable phase at lr, then a linear decay to min_lr over the last decay_fraction.
    decay_steps = max(1, round(t.max_steps * t.decay_fraction))
    decay_start = t.max_steps - decay_steps
    if step < decay_start:
        return t.lr
    progress = min(1.0, (step - decay_start) / max(1, decay_steps - 1))
    return t.lr + (t.min_lr - t.lr) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that DeepSpeed steps once per optimizer step; its state is saved with the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t) / t.lr)


def retarget_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, t: TrainConfig) -> None:
    """After a resume: the checkpoint restored the old run's base lr, but a changed `train.lr` must apply."""
    scheduler.base_lrs = [t.lr for _ in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr_at(scheduler.last_epoch, t)
