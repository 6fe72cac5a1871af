"""A decoder-only Transformer built from `ModelConfig`, read top to bottom (nanoGPT-style).

Llama-style (rmsnorm, rope, swiglu, no bias, untied) and GPT-2-style (layernorm, learned positions, gelu,
bias, tied) models are the same code with different options. Parameter names follow one fixed scheme so
that the HF export is a pure renaming (plus a transposition / q,k,v concatenation for GPT-2's Conv1D):

    tok_emb.weight                      model.embed_tokens.weight        | transformer.wte.weight
    pos_emb.weight                      -                                | transformer.wpe.weight
    blocks.{i}.attn_norm.*              model.layers.{i}.input_layernorm  | transformer.h.{i}.ln_1
    blocks.{i}.attn.{q,k,v}_proj.*      ...self_attn.{q,k,v}_proj        | ...attn.c_attn (concatenated)
    blocks.{i}.attn.o_proj.*            ...self_attn.o_proj              | ...attn.c_proj
    blocks.{i}.mlp_norm.*               ...post_attention_layernorm      | ...ln_2
    blocks.{i}.mlp.{gate,up,down}_proj  ...mlp.{gate,up,down}_proj       | ...mlp.c_fc (up), mlp.c_proj (down)
    blocks.{i}.{attn,mlp}_scale.gamma   (LayerScale: folded into o_proj / down_proj rows on export)
    norm_f.*                            model.norm                       | transformer.ln_f
                                        (model.norm_position=post: the norm of the embeddings, not exported)
    lm_head.weight                      lm_head.weight                   | lm_head.weight (tied to wte)

Labels convention (both `Transformer` and the HF adapter): `labels[b, t]` is the target for position t,
i.e. the loader already shifted them (nanoGPT's x, y); -100 is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_train.config import ModelConfig
from dist_train.model.blocks import Block, RotaryEmbedding, init_weights, make_norm
from dist_train.model.document_mask import DocumentLayout, DocumentMask
from dist_train.model.loss import IGNORE_INDEX, lm_loss
from dist_train.model.moe import MoEMLP, RouterRecord, RouterWindow, is_expert_parameter, router_losses
from dist_train.model.z_loss import ZLoss, model_loss

if TYPE_CHECKING:
    from dist_train.model.sequence_parallel import SequenceParallel

__all__ = ["IGNORE_INDEX", "Transformer", "lm_loss"]

class Transformer(nn.Module):
    """forward(input_ids (B, T), labels (B, T) | None) -> fp32 mean loss if labels else logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig, expert_parallel: tuple[int, int] = (1, 0)):
        """expert_parallel: (size, this rank's index) of the expert-parallel group, for an MoE model."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.pos == "rope" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.router_records: list[RouterRecord] = []
        """What each MoE layer's router did in the last forward (filled by the layers, emptied per forward)."""
        self.router_window = RouterWindow()
        self.blocks = nn.ModuleList(Block(cfg, mlp=self._moe_mlp(i, expert_parallel)) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.sequence_parallel: SequenceParallel | None = None
        """Set by `model.sequence_parallel.enable`: this rank holds one slice of each sequence."""
        self.z_loss: ZLoss | None = None
        """Set by `model.z_loss.enable` (train.z_loss > 0)."""
        self.document_mask: DocumentMask | None = None
        """Set by `model.document_mask.enable` (data.document_mask): attention and positions per document."""
        for module in self.modules():  # experts apart: each is drawn from its own generator (init_experts)
            if not any(is_expert_parameter(p) for p in module.parameters(recurse=False)):
                init_weights(module, cfg)
        for block in self.blocks:
            if isinstance(block.mlp, MoEMLP):
                block.mlp.init_experts(cfg, torch.initial_seed())
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _moe_mlp(self, layer: int, expert_parallel: tuple[int, int]) -> MoEMLP | None:
        """An MoE MLP for every model.moe.every-th block (the last of each group of `every`), else None."""
        moe = self.cfg.moe
        if not moe.enabled or (layer + 1) % moe.every:
            return None
        return MoEMLP(self.cfg, layer, self.router_records, *expert_parallel)

    def _documents(self, input_ids: torch.Tensor) -> DocumentLayout | None:
        """Positions and attention mask per document (data.document_mask), from the whole window's ids."""
        if self.document_mask is None:
            return None
        return self.document_mask.layout(input_ids, self.sequence_parallel.group if self.sequence_parallel else None)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The routers' weighted losses of the last forward, added to the loss for the backward (None: dense)."""
        return router_losses(self.router_records, self.cfg)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.lm_head(self.hidden_states(input_ids))  # (B, T, V)
        if self.router_records and self.training:
            self.router_window.add(self.router_records)
        if labels is None:
            return logits
        return model_loss(self, logits, labels)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final normed states (B, T, C) that the head maps to logits: a caller that needs the logits of a few
        positions only (downstream evaluation) projects just those."""
        self.router_records.clear()  # a recompute (grad checkpointing) appends again in the backward: not read
        T = input_ids.shape[1]  # under sequence parallelism: this rank's slice, which starts at `start`
        start = self.sequence_parallel.start(T) if self.sequence_parallel else 0
        documents = self._documents(input_ids)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            if self.pos_emb.num_embeddings < start + T:
                raise ValueError(f"sequence of {start + T} tokens is longer than the {self.cfg.seq_len} learned "
                                 f"positions (model.seq_len)")
            positions = torch.arange(start, start + T, device=input_ids.device) if documents is None \
                else documents.positions  # (T,) or (B, T)
            x = x + self.pos_emb(positions)  # (B, T, C)
        if self.cfg.norm_position == "post":
            x = self.norm_f(x)  # post-norm: every block ends normed, the embeddings are normed on the way in
        x = self.emb_dropout(x)
        rope = None
        if self.rotary is not None:
            # Cast once here rather than in every layer: each cast is a (T, hd) copy kept for the backward.
            angles = self.rotary(T, input_ids.device, start) if documents is None \
                else self.rotary.at(documents.positions)  # 2 x (T, hd), or 2 x (B, 1, T, hd) per document
            rope = tuple(t.to(x.dtype) for t in angles)
        allowed = None if documents is None else documents.mask  # (B, 1, T_window, T_window)
        recompute = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Recompute keeps only each block's input for the backward pass instead of all its activations.
            x = checkpoint(block, x, rope, allowed=allowed, use_reentrant=False) if recompute \
                else block(x, rope, allowed=allowed)
        if self.cfg.norm_position == "pre":
            x = self.norm_f(x)
        return x
