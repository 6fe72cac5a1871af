"""FlexAttention for data.document_mask: a block mask built from the window's document ids, so the kernel skips
every 128 x 128 block of scores that no query may see (torchtitan's block-causal flex attention).

A dense (B, 1, T, T) boolean mask costs SDPA the whole T x T score matrix and keeps it off the flash kernel; with
documents of ~1k tokens in an 8k window the blocks inside the documents are about a tenth of the causal triangle,
so the compiled FlexAttention kernel can be as fast as flash on the plain causal mask. The mask function is the
same rule as `document_mask.block_causal_mask`: key s <= query t, and both in the same document.

torch 2.13's FlexAttention has no backward on the CPU (and its eager form materialises the scores), so it is the
CUDA kernel: model.attention=auto takes it on CUDA when the document mask is on, `flex` asks for it anywhere the
forward can run (a CPU forward without gradients runs it unfused, which the tests use to check the mask).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """(B, T) document ids of the whole window -> FlexAttention's block mask of (B, 1, T, T), the same for every
    head: query t sees key s where s <= t and both lie in one document."""
    batch, length = doc_ids.shape

    def same_document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (doc_ids[b, q] == doc_ids[b, kv])

    # Compiled (torchtitan's way), the block mask is computed block by block; eager, it would materialise B x T x T
    # booleans first. Inside a compiled forward (train.compile) the tracer takes the plain function in.
    compiled = doc_ids.device.type == "cuda" and not torch.compiler.is_compiling()
    build = _compiled(create_block_mask) if compiled else create_block_mask
    return build(same_document_causal, batch, None, length, length, device=doc_ids.device)


@lru_cache(maxsize=2)
def _compiled(function: Any) -> Any:
    """`function` compiled once per process: FlexAttention uncompiled is a reference implementation that builds
    the whole score matrix (torch warns so)."""
    return torch.compile(function)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                            causal: bool = True, bias: torch.Tensor | None = None,
                            allowed: BlockMask | None = None) -> torch.Tensor:
    """q: (B, nh, T, hd); k, v: (B, nkv, T, hd), each kv head serving nh/nkv consecutive query heads (as SDPA's
    enable_gqa); allowed: the window's block mask -> (B, nh, T, hd). The signature of the other kernels; the
    causal rule is inside the block mask, and there is no dropout or bias (config validation refuses both)."""
    if dropout_p or bias is not None or allowed is None:
        raise ValueError("FlexAttention runs the document mask only, without dropout or a position bias")
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("model.attention=flex: torch's FlexAttention has no backward on the CPU; train on the "
                           "CPU with model.attention=auto (SDPA with a boolean document mask)")
    # Inside a compiled forward (train.compile) the tracer lowers flex_attention itself; on the CPU (forward only)
    # the reference implementation runs.
    plain = q.device.type == "cpu" or torch.compiler.is_compiling()
    kernel = flex_attention if plain else _compiled(flex_attention)
    return kernel(q, k, v, block_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


def is_block_mask(allowed: Any) -> bool:
    return isinstance(allowed, BlockMask)


def wants_flex(choice: str, device: torch.device, dropout: float) -> bool:
    """Whether the document mask is built for FlexAttention (else as a dense boolean mask for SDPA or matmul):
    model.attention=flex anywhere; auto on CUDA when there is no attention dropout (FlexAttention has none)."""
    if choice == "flex":
        return True
    return choice == "auto" and device.type == "cuda" and dropout == 0.0
