"""Document masking (data.document_mask): attention and positions confined to each document of a packed window.

The loader packs documents into windows across EOS. With the mask on, a token attends only to the tokens of its
own document, those after the window's last EOS before it (an EOS ends, and belongs to, its document; the window's
first token starts one), and positions restart at 0 at each document start, so every token sees what it would see
if its document were run alone from position 0 (Llama 3's training; Megatron-LM's reset_attention_mask and
reset_position_ids). Every position's next-token loss still counts.

Both come from the token ids of the whole window: under sequence parallelism (Ulysses) each rank holds a slice,
so the slices are all-gathered over the group first (B x T int64 ids, small beside the activations). Attention
then runs over the whole sequence after the all-to-all, with the mask of the whole window.

On CUDA (model.attention=auto or flex; without dropout, heads of 16 or more) the mask is FlexAttention's block
mask, built once per forward, and attention runs the compiled FlexAttention kernel, which skips the blocks no
query may see (`flex_kernel`). Elsewhere it is a boolean (B, 1, T, T) tensor handed to SDPA (or added as -inf to
the matmul kernel's scores); SDPA with an arbitrary mask cannot use the flash kernel and costs the masked blocks
too (bench/attention_mask.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from dist_train.model.flex_kernel import FlexPolicy, document_block_mask, flex_policy


def document_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) -> (B, T): the number of EOS tokens strictly before each position (an EOS keeps its document's id)."""
    eos = (input_ids == eos_token_id).long()
    return eos.cumsum(dim=1) - eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) positions within each document, 0 at its first token."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T): its document's start
    return index - first


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) boolean, True where query t may attend to key s: s <= t, same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)


@dataclass
class DocumentLayout:
    """What one forward needs: this rank's positions (B, T_local) and the whole window's mask (B, 1, T, T), dense
    booleans or FlexAttention's block mask."""

    positions: torch.Tensor
    mask: torch.Tensor | BlockMask


class DocumentMask:
    """The EOS id that separates documents, and where to build FlexAttention's block mask rather than the dense
    one: `flex` is "cuda" (on CUDA devices: what model.attention=auto and flex train with, `flex_kernel.
    flex_policy`), "never", or "always" (the CPU too, where FlexAttention runs forward only: tests and benches)."""

    def __init__(self, eos_token_id: int, flex: FlexPolicy = "never"):
        self.eos_token_id = eos_token_id
        self.flex = flex

    def layout(self, input_ids: torch.Tensor, group: Any = None) -> DocumentLayout:
        """input_ids: (B, T) this rank's tokens (a slice of the window when `group` is a sequence-parallel group,
        gathered over it)."""
        if group is None:
            full, start = input_ids, 0
        else:
            slices = [torch.empty_like(input_ids) for _ in range(dist.get_world_size(group))]
            dist.all_gather(slices, input_ids.contiguous(), group=group)
            full, start = torch.cat(slices, dim=1), dist.get_rank(group) * input_ids.shape[1]  # (B, T_window)
        doc = document_ids(full, self.eos_token_id)
        positions = document_positions(doc)[:, start:start + input_ids.shape[1]]  # (B, T_local)
        flex = self.flex == "always" or (self.flex == "cuda" and input_ids.device.type == "cuda")
        return DocumentLayout(positions=positions, mask=document_block_mask(doc) if flex else block_causal_mask(doc))


def enable(model: nn.Module, eos_token_id: int | None) -> None:
    """Mask `model`'s attention per document split at `eos_token_id` (None: the plain causal mask); the kernel
    follows the model's config (model.attention, model.dropout, its head size)."""
    if eos_token_id is None:
        model.document_mask = None
    else:
        model.document_mask = DocumentMask(eos_token_id, flex_policy(model.cfg))
