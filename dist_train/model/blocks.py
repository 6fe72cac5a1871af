"""The building blocks every architecture shares: norms, rotary embeddings, attention (SDPA or batched matmuls),
the MLP, LayerScale and the pre-norm residual block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import ModelConfig


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

    def forward(self, seq_len: int, device: torch.device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions [start, start + seq_len) (a sequence-parallel rank's slice starts later)."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)  # (hd/2,)
        t = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
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


SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)
"""torch >= 2.5's scaled_dot_product_attention takes `enable_gqa`: each kv head then serves its query heads inside
the kernel (the flash kernel on CUDA), without copying K and V nh/nkv times in memory."""


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention through torch's scaled_dot_product_attention (flash kernels on GPU).

    q: (B, nh, T, hd); k, v: (B, nkv, T, hd). Each kv head serves nh/nkv consecutive query heads (HF's
    repeat_kv layout, which is also SDPA's enable_gqa layout)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                              enable_gqa=True)  # (B, nh, T, hd)
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
        self.ulysses: nn.Module | None = None
        """Set by `model.sequence_parallel.enable`: the all-to-all around the attention kernel."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism q/k/v hold only this rank's heads (nh/tp, nkv/tp).
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attention = matmul_attention if use_matmul_attention(self.kernel, x) else sdpa_attention
        dropout = self.dropout if self.training else 0.0
        if self.ulysses is not None:  # T is this rank's slice; attention runs on the whole sequence
            y = self.ulysses(q, k, v, attention, dropout)  # (B, nh, T, hd)
        else:
            y = attention(q, k, v, dropout)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
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
