"""One optimizer step (micro-batches, gradient accumulation, the reduced loss), the count of non-finite steps that
stops a diverging run, and the validation loss during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dist_train import distributed
from dist_train.checkpoint.layout import TrainState
from dist_train.config import Config
from dist_train.data.build import Loader, build_loader
from dist_train.data.prefetch import Prefetcher
from dist_train.engine.parallel import ParallelLayout
from dist_train.model.build import model_vocab_size
from dist_train.train.optim import Skippable
from dist_train.train.signals import StopRequest

Batches = Loader | Prefetcher
"""What the training loop reads micro-batches from."""

EXIT_DIVERGED = 3  # train.max_bad_steps non-finite steps in a row: requeueing would repeat them


class TooManyBadSteps(RuntimeError):
    """Raised after train.max_bad_steps non-finite losses in a row; the last good checkpoint is intact."""


@dataclass
class StepResult:
    loss: float
    """Mean loss over the step's micro-batches and all ranks (nan when any rank's loss was not finite)."""
    skipped: bool
    """True when the update was skipped for a non-finite loss."""
    stop_requested: bool
    """True when any rank received a stop signal."""
    grad_norm: float | None = None
    """Global gradient norm before clipping (when measured)."""
    lr: float | None = None
    """Learning rate the step used."""


def train_step(engine: Any, optimizer: Skippable, data: Batches, accum: int, device: torch.device,
               stop: StopRequest, measure_grad_norm: bool = False, slices: int = 1) -> StepResult:
    """One optimizer step: `accum` micro-batches, then the update (skipped on every rank if any rank saw a
    non-finite loss). One all-reduce carries the loss, the bad-loss flag and the stop flag; the gradient norm
    is read to the host only when `measure_grad_norm` (a log step). `slices`: each rank's loss is one of that
    many shares of its sequences' loss (sequence parallelism)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on device: no host sync per micro-batch
    for micro in range(accum):
        # A batch is the model's positional inputs, labels last: (inputs, targets) for the decoder, (encoder
        # input, decoder input, labels) for the encoder-decoder.
        batch = data.next_batch()
        loss = engine(*(t.to(device, non_blocking=True) for t in batch))
        loss_sum += loss.detach().double()  # nan/inf stay non-finite in the sum
        extra = auxiliary_loss(engine.module)  # logged apart: the logged loss stays the cross-entropy
        backward(engine, loss if extra is None else loss + extra)
        if micro == accum - 1:
            # ZeRO 1-3 check the gradients and record their norm in step(); stage 0 does neither, so read the
            # (already all-reduced) gradients here: a non-finite norm is skipped like a non-finite loss.
            stage0_norm = stage0_grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
            # Under fp16 a non-finite gradient is the loss scaler's overflow: its optimizer skips the step and
            # lowers the scale by itself, which is no sign of divergence.
            bad_grads = (stage0_norm is not None and not engine.fp16_enabled()) and ~torch.isfinite(stage0_norm)
            flags = reduce_step(loss_sum / accum, stop.requested, bad_grads, slices)
            optimizer.skip_next_step = flags.skipped
        engine.step()
    optimizer.skip_next_step = False  # a ZeRO overflow check may have skipped the inner step itself
    if measure_grad_norm:
        flags.grad_norm = _finite_or_none(stage0_norm) if stage0_norm is not None else _engine_grad_norm(engine)
    return flags


def auxiliary_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """What the last forward adds to the loss for the backward: a Mixture-of-Experts model's load-balancing and
    router z-losses, and train.z_loss x log(Z)^2 of the output logits (None when neither is on)."""
    router = getattr(model, "auxiliary_loss", None)
    z_loss = getattr(model, "z_loss", None)
    parts = [router() if router is not None else None, z_loss.weighted() if z_loss is not None else None]
    parts = [part for part in parts if part is not None]
    return sum(parts[1:], parts[0]) if parts else None


_scaling_checked = False
"""Whether this process has seen how engine.backward treats a ZeRO-0 fp16 loss (see `backward`)."""


class LossScaledTwice(RuntimeError):
    """DeepSpeed scaled a ZeRO-0 fp16 loss that `backward` had already scaled: the workaround must go."""


def backward(engine: Any, loss: torch.Tensor) -> None:
    """`engine.backward(loss)`, with the fp16 loss scale applied at ZeRO-0 where DeepSpeed leaves it out.

    DeepSpeed 0.19.8's `engine.backward` scales the loss only for a ZeRO optimizer, yet at ZeRO-0 its fp16
    optimizers (FP16_UnfusedOptimizer, FP16_Optimizer) divide the gradients by the scale in `step()`: the
    updates come out 65,536 times too small next to AdamW's eps, clipping never engages and small fp16 gradients
    underflow (DeepSpeed PR #8393, open). So the loss is scaled here. Should a later DeepSpeed scale it as well, the
    gradient reaching the loss is the scale times larger than the 1 / accumulation steps expected, and the run
    stops with that said rather than train on gradients scaled twice."""
    global _scaling_checked
    if not (engine.fp16_enabled() and engine.zero_optimization_stage() == 0):
        engine.backward(loss)
        return
    scaled = loss * loss_scale(engine.optimizer)
    if _scaling_checked:  # DeepSpeed does what it did on the first micro-batch: no host sync every time
        engine.backward(scaled)
        return
    expected = 1.0 / engine.gradient_accumulation_steps()
    seen: list[float] = []
    hook = scaled.register_hook(lambda grad: seen.append(float(grad)))
    try:
        engine.backward(scaled)
    finally:
        hook.remove()
    if seen and not math.isclose(seen[0], expected, rel_tol=1e-3):
        raise LossScaledTwice(
            f"this DeepSpeed scales the fp16 loss at ZeRO-0 itself (d backward/d loss = {seen[0]:g}, expected "
            f"{expected:g}), and dist_train's workaround for DeepSpeed 0.19.8 scales it too; until dist_train drops "
            f"the workaround use deepspeed.zero_stage=1 or higher, or precision=bf16")
    _scaling_checked = True


def reduce_step(local_loss: torch.Tensor, stop: bool, bad_grads: bool | torch.Tensor, slices: int = 1) -> StepResult:
    """Sum (loss if finite, non-finite flag, stop flag) over ranks in one all-reduce (the step's one host
    sync); `bad_grads` may be a tensor on the device. The mean loss divides by the number of ranks that hold
    whole sequences' losses: world size / `slices` (the shares of one sequence group add up to its loss;
    tensor-parallel ranks each hold the same whole loss)."""
    finite = torch.isfinite(local_loss)
    bad = (~finite) | bad_grads
    values = torch.stack([torch.where(finite, local_loss, torch.zeros_like(local_loss)), bad.double(),
                          torch.full_like(local_loss, float(stop))])
    totals = distributed.sum_over_ranks(values).tolist()
    skipped = totals[1] > 0
    return StepResult(loss=math.nan if skipped else totals[0] * slices / distributed.world_size(), skipped=skipped,
                      stop_requested=totals[2] > 0)


def count_bad_step(state: TrainState, result: StepResult, max_bad_steps: int) -> None:
    if not result.skipped:
        state.consecutive_bad_steps = 0
        return
    state.consecutive_bad_steps += 1
    state.skipped_steps += 1
    if state.consecutive_bad_steps >= max_bad_steps:
        raise TooManyBadSteps(
            f"{state.consecutive_bad_steps} steps in a row (up to step {state.step}) had a non-finite loss or "
            f"gradient and were skipped (train.max_bad_steps={max_bad_steps}); stopping. The last good checkpoint "
            f"is intact: lower train.lr, raise train.warmup_steps or use precision=bf16, then re-run to resume.")


@torch.no_grad()
def validation_loss(engine: Any, cfg: Config, layout: ParallelLayout, device: torch.device) -> float:
    """Mean loss over the first train.eval_steps validation batches (the same batches every time). The sum stays
    on the device until the end: one host sync per evaluation, not one per batch."""
    val_data = build_loader(cfg, "val", layout.data_rank, layout.data, model_vocab_size(cfg)[0],
                            sequence_rank=layout.sequence_rank, sequence_size=layout.sequence)
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(cfg.train.eval_steps):
        total += engine(*(t.to(device, non_blocking=True) for t in val_data.next_batch())).double()
    engine.train()
    return distributed.mean_over_ranks(total.item() / cfg.train.eval_steps) * layout.sequence


def loss_scale(optimizer: Any) -> float | None:
    """The fp16 loss scale of a DeepSpeed optimizer wrapper, None without one. ZeRO-0's FP16_Optimizer and
    FP16_UnfusedOptimizer keep it in `loss_scale_config.cur_scale`, ZeRO 1-3 expose `cur_scale` (DeepSpeed
    0.19's engine._get_optimizer_loss_scale reads the same two places)."""
    config = getattr(optimizer, "loss_scale_config", None)
    scale = config.cur_scale if config is not None else getattr(optimizer, "cur_scale", None)
    return None if scale is None else float(scale)


def stage0_grad_norm(engine: Any) -> torch.Tensor | None:
    """Norm of the gradients the ZeRO-0 module holds, on the device, divided by the fp16 loss scale (the module's
    gradients are those of the scaled loss); None when DeepSpeed keeps the gradients elsewhere (e.g. bf16)."""
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    if not norms:
        return None
    norm = torch.linalg.vector_norm(torch.stack(norms))
    scale = loss_scale(engine.optimizer) if engine.fp16_enabled() else None
    return norm / scale if scale else norm


def _finite_or_none(norm: torch.Tensor) -> float | None:
    value = norm.item()
    return value if math.isfinite(value) else None


def _engine_grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)
