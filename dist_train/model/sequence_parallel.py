"""Sequence parallelism (DeepSpeed-Ulysses) for our Transformer and for transformers models.

Each rank of a sequence-parallel group of size P holds one contiguous slice of T/P tokens of every sequence:
embeddings, norms, MLPs and the head run on the slice. Around the attention kernel DeepSpeed's
`DistributedAttention` trades the slice for a share of the heads by all-to-all (every rank then attends over
all T tokens with nh/P query and nkv/P key/value heads) and trades back afterwards. Positions are global:
rank r's slice starts at r*T/P, for RoPE and learned tables alike. The loss is the mean over all tokens of the
full sequences (`model.loss.sliced_lm_loss`).

A transformers model (`model.hf_config`) gets DeepSpeed's ALST `UlyssesSPAttentionHF`, which replaces its
attention function (sdpa) and all-gathers the position ids we pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_train.model.loss import sliced_lm_loss

AttentionKernel = Callable[..., torch.Tensor]  # (q, k, v, dropout_p, allowed=None) -> attention output


class SequenceParallel:
    """Where this rank's slice sits in the sequence, and the loss over the whole sequence."""

    def __init__(self, group: Any):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def start(self, local_len: int) -> int:
        """Position of this rank's first token (slices are contiguous and equal)."""
        return self.rank * local_len

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sliced_lm_loss(logits, labels, self.group)


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: AttentionKernel,
                 dropout_p: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """DistributedAttention hands over (B, T, heads/P, hd); our kernels take (B, heads/P, T, hd). allowed: the
    whole window's (B, 1, T, T) document mask (data.document_mask), or None for the causal mask."""
    y = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, allowed=allowed)
    return y.transpose(1, 2)


class UlyssesAttention(nn.Module):
    """DeepSpeed's DistributedAttention around one of our attention kernels (sdpa or matmul)."""

    def __init__(self, group: Any):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        # Batch-first layout (B, T, heads, hd): scatter the heads (dim 2), gather the sequence (dim 1).
        self.attention = DistributedAttention(_heads_first, group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: AttentionKernel,
                dropout_p: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """q: (B, nh, T/P, hd), k, v: (B, nkv, T/P, hd) -> (B, nh, T/P, hd), attended over all T tokens (those
        `allowed`, (B, 1, T, T), lets each query see, under data.document_mask)."""
        y = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, kernel, dropout_p,
                           allowed)
        return y.transpose(1, 2)  # (B, nh, T/P, hd)


def enable(model: nn.Module, group: Any) -> None:
    """Make our Transformer sequence-parallel over `group` (its attention modules get the all-to-all)."""
    from dist_train.model.blocks import Attention

    model.sequence_parallel = SequenceParallel(group)
    for module in model.modules():
        if isinstance(module, Attention):
            module.ulysses = UlyssesAttention(group)


def enable_hf(model: nn.Module, sequence: int, micro_batch_size: int, seq_len: int) -> Any:
    """Make an HFCausalLM sequence-parallel with DeepSpeed's ALST: creates the sequence-parallel groups and
    routes the model's sdpa attention through UlyssesSPAttentionHF. Returns DeepSpeed's groups (the `mpu`)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model.model, core_attn_implementation="sdpa", sequence_parallel_size=sequence,
        micro_batch_size=micro_batch_size, seq_length=seq_len, seq_length_is_variable=False)
    model.sequence_parallel = SequenceParallel(mpu.get_sequence_parallel_group())
    return mpu
