"""PaLM's z-loss (train.z_loss; Chowdhery et al. 2022, section 5): train.z_loss x the mean over the loss's tokens
of log(Z)^2, Z = sum_v exp(logit_v) the softmax normaliser of the output logits, added to the loss.

The cross-entropy does not change when every logit of a position shifts by the same amount, so nothing holds log Z
in place: it can drift far from 0, where 16-bit logits are rounded coarsely and the softmax saturates. The z-loss
pulls it back towards 0 (PaLM weights it 1e-4 and found that it made training more stable).

A model given a `ZLoss` (`enable`) computes log(Z)^2 in each training forward together with its cross-entropy
(one logsumexp for both, `model.loss.lm_and_z_loss`), which it returns; the training step adds the weighted
value of the last forward for the backward (`train.step.auxiliary_loss`), and each log line shows the unweighted
mean over its window as `z_loss`. Evaluation forwards compute the cross-entropy alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_train.model.loss import lm_and_z_loss, lm_loss


class ZLoss:
    """The z-loss of a model's training forwards: the last one's (with its graph, for the backward) and the sum
    of their values since the last log line, on the device (no host sync per step)."""

    def __init__(self, coef: float):
        self.coef = coef
        self.last: torch.Tensor | None = None
        self.window_sum: torch.Tensor | None = None
        self.forwards = 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, group: Any = None) -> torch.Tensor:
        """The mean cross-entropy (this rank's share of it under sequence parallelism); keeps log(Z)^2."""
        loss, z = lm_and_z_loss(logits, labels, group)
        self.last = z
        self.window_sum = z.detach() if self.window_sum is None else self.window_sum + z.detach()
        self.forwards += 1
        return loss

    def weighted(self) -> torch.Tensor | None:
        """train.z_loss x the last training forward's log(Z)^2, once (None when there was none since)."""
        z, self.last = self.last, None
        return None if z is None else self.coef * z

    def take(self, slices: int = 1) -> dict[str, float]:
        """z_loss: the mean log(Z)^2 per training forward since the last call, averaged over the ranks that hold
        whole sequences (the shares of a sequence-parallel group's `slices` ranks add up to its value). Every
        rank must call it."""
        from dist_train import distributed

        if self.window_sum is None:
            return {}
        total = distributed.sum_over_ranks(self.window_sum.double().reshape(1)).item()
        out = {"z_loss": total * slices / distributed.world_size() / self.forwards}
        self.window_sum, self.forwards = None, 0
        return out


def enable(model: nn.Module, coef: float) -> None:
    """Give `model` (any of dist_train's models, ours or a transformers one) the z-loss of weight `coef` (0: none)."""
    model.z_loss = ZLoss(coef) if coef else None


def model_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a model's forward returns: the mean cross-entropy over its sequences (this rank's share under
    sequence parallelism); in a training forward with the z-loss on, computed along with log(Z)^2."""
    sequence_parallel = getattr(model, "sequence_parallel", None)
    z_loss: ZLoss | None = getattr(model, "z_loss", None)
    if z_loss is not None and model.training and torch.is_grad_enabled():
        return z_loss(logits, labels, None if sequence_parallel is None else sequence_parallel.group)
    if sequence_parallel is not None:
        return sequence_parallel.loss(logits, labels)
    return lm_loss(logits, labels)
