"""The language-model loss: mean cross-entropy over the tokens of a batch, whole or cut into sequence slices, and
with it (train.z_loss) the mean log(Z)^2 of PaLM's z-loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignored positions, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def sliced_lm_loss(logits: torch.Tensor, labels: torch.Tensor, group: Any) -> torch.Tensor:
    """This rank's share of the mean over the *whole* sequences of a sequence-parallel group: the sum of its
    tokens' cross-entropies divided by the group's count of non-ignored tokens. The shares add up to the mean
    of the full sequences, and DeepSpeed sums gradients over the sequence-parallel ranks (it divides by the
    data-parallel size only), so the gradients are those of that mean."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(total.dtype)
    dist.all_reduce(count, group=group)  # a count: no gradient flows through it
    return total / count.clamp(min=1)


def lm_and_z_loss(logits: torch.Tensor, labels: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean log(Z)^2) over the non-ignored positions, in fp32, Z = sum(exp(logits)) the
    softmax normaliser; with a sequence-parallel `group`, this rank's shares of the group's means (as
    `sliced_lm_loss`). One logsumexp serves both (cross-entropy = log Z - the target's logit), so the backward
    keeps one fp32 copy of the logits, as `lm_loss` does."""
    x = logits.flatten(0, 1).float()  # (N, V)
    targets = labels.flatten()  # (N,)
    kept = targets != IGNORE_INDEX
    log_z = torch.logsumexp(x, dim=-1)  # (N,)
    target_logit = x.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    ce_sum = torch.where(kept, log_z - target_logit, zero).sum()
    z_sum = torch.where(kept, log_z.square(), zero).sum()
    count = kept.sum().to(x.dtype)
    if group is not None:
        dist.all_reduce(count, group=group)  # a count: no gradient flows through it
    count = count.clamp(min=1)
    return ce_sum / count, z_sum / count
