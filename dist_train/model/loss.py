"""The language-model loss: mean cross-entropy over the tokens of a batch, whole or cut into sequence slices.
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
