"""FlexAttention for data.document_mask: a block mask built from the window's document ids, so the kernel skips
every 128 x 128 block of scores that no query may see (torchtitan's block-causal flex attention).

A dense (B, 1, T, T) boolean mask costs SDPA the whole T x T score matrix and keeps it off the flash kernel; with
documents of ~1k tokens in an 8k window the blocks inside the documents are about a seventh of the causal
triangle, so the compiled FlexAttention kernel can be as fast as flash on the plain causal mask. The mask
function is the same rule as `document_mask.block_causal_mask`: key s <= query t, and both in the same document.

torch 2.13's FlexAttention has no backward on the CPU (and its eager form materialises the scores), so it is the
CUDA kernel: model.attention=auto and flex take it on CUDA when the document mask is on (`flex_policy`); the
tests check the mask through the CPU forward, which runs it unfused.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from dist_train.config import ModelConfig
from dist_train.config.validation import FLEX_MIN_HEAD_DIM


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
    if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("model.attention=flex: torch's FlexAttention has no backward on the CPU; train on the "
                           "CPU with model.attention=auto (SDPA with a boolean document mask)")
    # Inside a compiled forward (train.compile) the tracer lowers flex_attention itself; on the CPU (forward only)
    # the reference implementation runs.
    plain = q.device.type == "cpu" or torch.compiler.is_compiling()
    kernel = flex_attention if plain else _compiled(flex_attention)
    return kernel(q, k, v, block_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


def is_block_mask(allowed: Any) -> bool:
    return isinstance(allowed, BlockMask)


FlexPolicy = Literal["cuda", "never", "always"]
"""Where DocumentMask builds FlexAttention's block mask: on CUDA devices, never, or always (the CPU too)."""


def flex_policy(cfg: ModelConfig) -> FlexPolicy:
    """Where a model of `cfg` builds the document mask for FlexAttention: on CUDA under model.attention=auto or
    flex, when it has no attention dropout (FlexAttention has none) and heads of 16 or more (validation refuses
    `flex` otherwise; `auto` keeps the dense mask). On the CPU FlexAttention has no backward and its forward is
    an unfused reference that holds heads x T x T scores, so a run trained with `flex` is evaluated there on
    the dense mask, the same math."""
    usable = cfg.dropout == 0.0 and cfg.head_dim >= FLEX_MIN_HEAD_DIM
    return "cuda" if cfg.attention in ("auto", "flex") and usable else "never"
