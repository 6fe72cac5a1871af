"""An encoder-decoder Transformer built from `ModelConfig` (model.arch=encoder_decoder), read top to bottom.

The encoder reads the corrupted text with bidirectional self-attention; the decoder writes the masked spans with
causal self-attention plus cross-attention to the encoder's output (Vaswani et al. 2017; T5, Raffel et al. 2020).
The blocks are the decoder-only model's (`dist_train.model.blocks`); one token embedding is shared by the encoder,
the decoder and (tie_embeddings) the output head.

Two layouts export to a transformers class with no custom code (`dist_train.tools.export`):
- T5 v1.1 (`T5ForConditionalGeneration`, the primary one): norm_position=pre, rmsnorm, pos=relative, no bias,
  tied head, mlp geglu (swiglu and gelu map too). T5's attention has no 1/sqrt(head_dim): it is folded into q.
- BART (`BartForConditionalGeneration`): norm_position=post, layernorm, pos=learned, mlp=gelu (BART's position
  tables carry 2 unused leading rows, written as zeros; missing biases are written as zeros).

Parameter names and their T5 names (BART's in the export module):

    tok_emb.weight                          shared.weight (also the encoder's and decoder's embed_tokens)
    {encoder,decoder}.rel_bias.weight       {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias
    {encoder,decoder}.pos_emb.weight        (pos=learned: BART's embed_positions)
    encoder.blocks.{i}.attn_norm / attn.*   encoder.block.{i}.layer.0.layer_norm / .SelfAttention.{q,k,v,o}
    encoder.blocks.{i}.mlp_norm / mlp.*     encoder.block.{i}.layer.1.layer_norm / .DenseReluDense.{wi_0,wi_1,wo}
    decoder.blocks.{i}.attn_norm / attn.*   decoder.block.{i}.layer.0 ...
    decoder.blocks.{i}.cross_norm / cross_attn.*   decoder.block.{i}.layer.1.layer_norm / .EncDecAttention.*
    decoder.blocks.{i}.mlp_norm / mlp.*     decoder.block.{i}.layer.2 ...
    {encoder,decoder}.norm.weight           {encoder,decoder}.final_layer_norm (post-norm: the embeddings' norm)
    lm_head.weight                          lm_head.weight (tied to shared)

Labels: `labels[b, t]` is the target of decoder position t (the decoder input is the labels shifted right behind
a start token, see `dist_train.data.span_corruption`); -100 is ignored.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_train.config import ModelConfig
from dist_train.model.blocks import Block, RelativePositionBias, RotaryEmbedding, init_weights, make_norm
from dist_train.model.z_loss import ZLoss, model_loss


class Stack(nn.Module):
    """The encoder (bidirectional self-attention) or the decoder (causal self-attention + cross-attention): its
    positions, its blocks and its norm (after the blocks when pre-norm, on the embeddings when post-norm)."""

    def __init__(self, cfg: ModelConfig, is_decoder: bool):
        super().__init__()
        self.cfg = cfg
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.rel_bias = RelativePositionBias(cfg.n_heads, bidirectional=not is_decoder) if cfg.pos == "relative" \
            else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.pos == "rope" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=is_decoder, cross=is_decoder) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x: token embeddings (B, T, C); memory: the encoder output (B, Te, C) for the decoder."""
        T = x.shape[1]
        if self.pos_emb is not None:
            if self.pos_emb.num_embeddings < T:
                raise ValueError(f"sequence of {T} tokens is longer than the {self.cfg.seq_len} learned "
                                 f"positions (model.seq_len)")
            x = x + self.pos_emb(torch.arange(T, device=x.device))  # (B, T, C)
        if self.cfg.norm_position == "post":
            x = self.norm(x)
        x = self.emb_dropout(x)
        rope = None if self.rotary is None else tuple(t.to(x.dtype) for t in self.rotary(T, x.device))
        bias = None if self.rel_bias is None else self.rel_bias(T, T)  # (1, nh, T, T), shared by every layer
        recompute = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, rope, bias, memory, use_reentrant=False) if recompute \
                else block(x, rope, bias, memory)
        return self.norm(x) if self.cfg.norm_position == "pre" else x  # (B, T, C)


class EncoderDecoder(nn.Module):
    """forward(encoder_ids (B, Te), decoder_ids (B, Td), labels (B, Td) | None) -> fp32 mean loss if labels
    else logits (B, Td, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.z_loss: ZLoss | None = None
        """Set by `model.z_loss.enable` (train.z_loss > 0)."""
        self.apply(lambda module: init_weights(module, cfg))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def encode(self, encoder_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.tok_emb(encoder_ids))  # (B, Te, C)

    def decode(self, decoder_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.decoder(self.tok_emb(decoder_ids), memory))  # (B, Td, V)

    def forward(self, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.decode(decoder_ids, self.encode(encoder_ids))
        return logits if labels is None else model_loss(self, logits, labels)

    @torch.no_grad()
    def greedy(self, encoder_ids: torch.Tensor, start_id: int, new_tokens: int) -> torch.Tensor:
        """Greedy decoding without a cache (each step re-reads the whole prefix): (B, 1 + new_tokens) ids."""
        memory = self.encode(encoder_ids)
        out = torch.full((encoder_ids.shape[0], 1), start_id, dtype=torch.long, device=encoder_ids.device)
        for _ in range(new_tokens):
            out = torch.cat([out, self.decode(out, memory)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
