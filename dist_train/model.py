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
    lm_head.weight                      lm_head.weight                   | lm_head.weight (tied to wte)

Labels convention (both `Transformer` and the HF adapter): `labels[b, t]` is the target for position t,
i.e. the loader already shifted them (nanoGPT's x, y); -100 is ignored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_train.config import ModelConfig
from dist_train.distributed import gathered_for_init

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignored positions, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like HF Llama's so bf16 runs export bit-compatibly."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)  # RMSNorm has no bias in any published model
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, HF Llama convention: the two halves of each head are rotated together
    (rotate_half, not interleaved pairs), so our q/k weights need no permutation on export.

    cos/sin are recomputed in fp32 per forward rather than kept as buffers: DeepSpeed's bf16 cast would
    round registered buffers, and the cost (T x head_dim/2 values, once per model forward) is negligible.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)  # (hd/2,)
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos, sin: (T, hd), already in x's dtype (computed in fp32 and cast, as HF does)."""
    return x * cos + rotate_half(x) * sin


# Up to this length, bf16/fp16 attention on the CPU is faster as two batched matmuls than through torch's CPU
# flash kernel, whose 16-bit forward + backward has a large fixed cost: 1.5-1.9x at 128 tokens for 4/2 heads of
# 32 and 12 heads of 64 on one core of an AMD EPYC. Its memory grows with seq_len^2, and from 192 tokens flash can
# be the faster one (bench/attention_kernels.py prints both). In fp32 the two are even at 128 tokens.
MATMUL_ATTENTION_MAX_LEN = 128


def use_matmul_attention(choice: str, x: torch.Tensor) -> bool:
    if choice != "auto":
        return choice == "matmul"
    is_16_bit = x.dtype in (torch.bfloat16, torch.float16)
    return x.device.type == "cpu" and is_16_bit and x.shape[1] <= MATMUL_ATTENTION_MAX_LEN


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention through torch's scaled_dot_product_attention (flash kernels on GPU).

    q: (B, nh, T, hd); k, v: (B, nkv, T, hd). Each kv head serves nh/nkv consecutive query heads (HF's
    repeat_kv layout)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, T, hd)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, nh, T, hd)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention as HF's "eager" attention computes it: scores in q's dtype, softmax in fp32.

    q: (B, nh, T, hd); k, v: (B, nkv, T, hd) with nh a multiple of nkv. The rep = nh/nkv query heads that share
    a kv head are stacked along the rows, so k and v are never repeated: (B, nkv, rep*T, hd) @ (B, nkv, hd, T)."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    q = q.reshape(B * nkv, (nh // nkv) * T, hd)  # query heads h = g*rep + r, rows r*T + t
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1).repeat(nh // nkv, 1)
    # One kernel for scale, mask and q k^T: (rep*T, T) + (B*nkv, rep*T, hd) @ (B*nkv, hd, T).
    scores = torch.baddbmm(future, q, k.reshape(B * nkv, T, hd).transpose(1, 2), alpha=hd**-0.5)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # (B*nkv, rep*T, T)
    probs = F.dropout(probs, dropout_p) if dropout_p else probs
    return (probs @ v.reshape(B * nkv, T, hd)).view(B, nh, T, hd)  # (B, nh, T, hd)


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention (n_kv_heads <= n_heads) and optional RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.kernel = cfg.attention
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.o_proj.is_residual_out = True  # scaled init, see Transformer._init_weights

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attention = matmul_attention if use_matmul_attention(self.kernel, x) else sdpa_attention
        y = attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Llama: down(silu(gate(x)) * up(x))) or GELU (GPT-2: down(gelu(up(x))))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.down_proj.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, d_ff)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, d_ff); GPT-2's "gelu_new"
        return self.down_proj(h)  # (B, T, C)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT, Touvron et al. 2021), initialised small so
    each block starts close to the identity."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), each branch optionally LayerScaled."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        on = cfg.layerscale_init is not None
        self.attn_scale = LayerScale(cfg.d_model, cfg.layerscale_init) if on else nn.Identity()
        self.mlp_scale = LayerScale(cfg.d_model, cfg.layerscale_init) if on else nn.Identity()
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn_scale(self.resid_dropout(self.attn(self.attn_norm(x), rope)))  # (B, T, C)
        x = x + self.mlp_scale(self.resid_dropout(self.mlp(self.mlp_norm(x))))  # (B, T, C)
        return x


class Transformer(nn.Module):
    """forward(input_ids (B, T), labels (B, T) | None) -> fp32 mean loss if labels else logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.pos == "rope" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 / Llama init: N(0, init_std); the projections that write into the residual stream are
        # scaled by 1/sqrt(2 n_layers) so the stream's variance does not grow with depth (GPT-2 paper).
        # Built under ZeRO-3's zero.Init, each module's weights are already partitioned here: gather them.
        with gathered_for_init(list(module.parameters(recurse=False))):
            if isinstance(module, nn.Linear):
                std = self.cfg.init_std
                if getattr(module, "is_residual_out", False):
                    std /= math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            if self.pos_emb.num_embeddings < T:
                raise ValueError(f"sequence of {T} tokens is longer than the {self.cfg.seq_len} learned "
                                 f"positions (model.seq_len)")
            x = x + self.pos_emb(torch.arange(T, device=input_ids.device))  # (B, T, C)
        x = self.emb_dropout(x)
        rope = None
        if self.rotary is not None:
            # Cast once here rather than in every layer: each cast is a (T, hd) copy kept for the backward.
            rope = tuple(t.to(x.dtype) for t in self.rotary(T, input_ids.device))  # 2 x (T, hd)
        recompute = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Recompute keeps only each block's input for the backward pass instead of all its activations.
            x = checkpoint(block, x, rope, use_reentrant=False) if recompute else block(x, rope)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        return logits if labels is None else lm_loss(logits, labels)


class HFCausalLM(nn.Module):
    """Any `transformers` causal LM behind our forward signature (labels already shifted, see module doc).

    Given a ZeRO-3 DeepSpeed config, transformers builds the model under `deepspeed.zero.Init` and initialises
    each module through its gathered partitions: no rank ever holds the whole model."""

    def __init__(self, cfg: ModelConfig, zero3_config: dict[str, Any] | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            hf_cfg = AutoConfig.from_pretrained(cfg.hf_config)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.hf_config: cannot read a transformers config from {cfg.hf_config}: {e}; "
                             f"pass a folder holding config.json or the path of a config.json") from e
        # transformers looks for a live HfDeepSpeedConfig through a global weak reference; alive only while this
        # model is built, or every later from_config (the meta-device FLOP count) would be partitioned too.
        zero3_marker = None
        if zero3_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            zero3_marker = HfDeepSpeedConfig(zero3_config)
        self.model = AutoModelForCausalLM.from_config(hf_cfg)
        del zero3_marker
        if cfg.grad_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable (a deprecated alias until v6).
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        return logits if labels is None else lm_loss(logits, labels)


def build_model(cfg: ModelConfig, zero3_config: dict[str, Any] | None = None) -> nn.Module:
    """Our Transformer, or the HF architecture named by cfg.hf_config. `zero3_config` (a ZeRO-3 DeepSpeed
    config) makes transformers build an HF model partitioned; our Transformer is partitioned by building it
    inside `deepspeed.zero.Init` (see trainer.build_partitioned_model)."""
    return HFCausalLM(cfg, zero3_config) if cfg.hf_config else Transformer(cfg)
