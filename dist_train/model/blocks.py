"""The building blocks every architecture shares: norms, rotary embeddings, T5's relative position bias, attention
(causal or bidirectional, self or cross; SDPA or batched matmuls), the MLP, LayerScale, the residual block (pre- or
post-norm, with cross-attention in an encoder-decoder's decoder) and the weight init.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import ModelConfig
from dist_train.distributed.process_group import gathered_for_init
from dist_train.model.flex_kernel import flex_document_attention, is_block_mask


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

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, hd) of per-sequence positions (B, T) (data.document_mask restarts them per document)."""
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)  # (hd/2,)
        freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hd)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos, sin: (T, hd) or (B, 1, T, hd), already in x's dtype (computed in fp32 and cast, as
    HF does)."""
    return x * cos + rotate_half(x) * sin


class RelativePositionBias(nn.Embedding):
    """T5's relative attention bias: one learned scalar per head for each bucket of key - query distances, added
    to the attention scores of every layer of a stack. Exact distances up to 8 (16 one-sided), then log-spaced
    buckets up to 128; the encoder tells left from right, the decoder only looks left (T5's
    `_relative_position_bucket`, reproduced to the bit so the export computes the same bias)."""

    NUM_BUCKETS = 32
    MAX_DISTANCE = 128

    def __init__(self, n_heads: int, bidirectional: bool):
        super().__init__(self.NUM_BUCKETS, n_heads)
        self.bidirectional = bidirectional

    def buckets(self, relative: torch.Tensor) -> torch.Tensor:
        """relative: (Tq, Tk) key position - query position -> bucket ids (Tq, Tk)."""
        num_buckets, out = self.NUM_BUCKETS, torch.zeros_like(relative)
        if self.bidirectional:
            num_buckets //= 2
            out = (relative > 0).long() * num_buckets
            distance = relative.abs()
        else:
            distance = -torch.clamp(relative, max=0)
        max_exact = num_buckets // 2
        log_ratio = torch.log(distance.float() / max_exact) / math.log(self.MAX_DISTANCE / max_exact)
        large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
        return out + torch.where(distance < max_exact, distance, large)

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:  # type: ignore[override]
        device = self.weight.device
        relative = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
        bias = super().forward(self.buckets(relative))  # (Tq, Tk, nh)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nh, Tq, Tk)


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


def gqa_in_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether SDPA should share the kv heads itself (`enable_gqa`) rather than be given repeated K and V. On CUDA
    only its flash and math kernels take `enable_gqa` (torch 2.13's documentation), and flash runs in fp16/bf16
    only: an fp32 (or TF32) run would fall back to the math kernel, which holds a Tq x Tk score matrix per head,
    where repeated K and V let the memory-efficient kernel run."""
    return SDPA_HAS_GQA and (device_type != "cuda" or dtype in (torch.float16, torch.bfloat16))


def _additive_mask(q: torch.Tensor, k_len: int, causal: bool, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Added to the scores: the position bias (1, nh, Tq, Tk) and/or -inf above the diagonal when causal."""
    if not causal:
        return bias
    q_len = q.shape[2]
    future = torch.full((q_len, k_len), float("-inf"), dtype=q.dtype, device=q.device).triu(1)  # (Tq, Tk)
    return future if bias is None else bias + future


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool = True,
                   bias: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Attention through torch's scaled_dot_product_attention (flash kernels on GPU when there is no bias).

    q: (B, nh, Tq, hd); k, v: (B, nkv, Tk, hd); bias: (1, nh, Tq, Tk) added to the scores; allowed: (B, 1, Tq, Tk)
    boolean, the keys each query may see (data.document_mask; it replaces the causal mask). Each kv head serves
    nh/nkv consecutive query heads (HF's repeat_kv layout, which is also SDPA's enable_gqa layout)."""
    rep = q.shape[1] // k.shape[1]
    if allowed is not None:
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)  # (B, nh, Tq, hd)
    if rep > 1 and bias is None and gqa_in_kernel(q.device.type, q.dtype):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p,
                                              enable_gqa=True)  # (B, nh, Tq, hd)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, hd)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)  # (B, nh, Tq, hd)
    mask = _additive_mask(q, k.shape[2], causal, bias.to(q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, Tq, hd)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, causal: bool = True,
                     bias: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Attention as HF's "eager" attention computes it: scores in q's dtype, softmax in fp32.

    q: (B, nh, Tq, hd); k, v: (B, nkv, Tk, hd) with nh a multiple of nkv; bias: (1, nh, Tq, Tk); allowed: (B, 1,
    Tq, Tk) boolean, the keys each query may see (replaces the causal mask). The rep = nh/nkv
    query heads that share a kv head are stacked along the rows, so k and v are never repeated:
    (B, nkv, rep*Tq, hd) @ (B, nkv, hd, Tk)."""
    B, nh, Tq, hd = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    rep = nh // nkv
    q = q.reshape(B * nkv, rep * Tq, hd)  # query heads h = g*rep + r, rows r*Tq + t
    kt = k.reshape(B * nkv, Tk, hd).transpose(1, 2)
    if allowed is not None:  # the same for every head: (B, 1, Tq, Tk) -> (B*nkv, rep*Tq, Tk)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        mask = mask.expand(B, nkv, rep, Tq, Tk).reshape(B * nkv, rep * Tq, Tk)
    else:
        mask = _additive_mask(q.view(B, nh, Tq, hd), Tk, causal, None if bias is None else bias.to(q.dtype))
    if mask is None:
        scores = torch.bmm(q, kt) * hd**-0.5
    else:  # one kernel for scale, mask and q k^T: (.., rep*Tq, Tk) + (B*nkv, rep*Tq, hd) @ (B*nkv, hd, Tk)
        if mask.dim() == 2:
            mask = mask.repeat(rep, 1)  # (rep*Tq, Tk): the same for every head
        else:
            mask = mask.reshape(nkv, rep * Tq, Tk).repeat(B, 1, 1)  # (B*nkv, rep*Tq, Tk)
        scores = torch.baddbmm(mask, q, kt, alpha=hd**-0.5)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # (B*nkv, rep*Tq, Tk)
    probs = F.dropout(probs, dropout_p) if dropout_p else probs
    return (probs @ v.reshape(B * nkv, Tk, hd)).view(B, nh, Tq, hd)  # (B, nh, Tq, hd)


class Attention(nn.Module):
    """Multi-head attention with grouped-query attention (n_kv_heads <= n_heads), optional q/k norms, optional RoPE
    and an optional additive position bias: causal or bidirectional self-attention, or cross-attention to `memory`
    (the encoder's output) when given one."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = causal
        self.dropout = cfg.dropout
        self.kernel = cfg.attention
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.o_proj.is_residual_out = True  # scaled init, see Transformer._init_weights
        # model.qk_norm: one RMSNorm over head_dim for all query heads and one for all key heads (Qwen3's). Per
        # head, so a tensor-parallel rank's heads or a sequence-parallel rank's tokens are normed alone.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.ulysses: nn.Module | None = None
        """Set by `model.sequence_parallel.enable`: the all-to-all around the attention kernel."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                bias: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """allowed: the keys each query may see (data.document_mask): (B, 1, T_window, T_window) booleans, or
        FlexAttention's block mask of the window."""
        B, T, _ = x.shape
        source = x if memory is None else memory  # (B, Tk, C): keys and values come from here
        Tk = source.shape[1]
        # -1 heads: under tensor parallelism q/k/v hold only this rank's heads (nh/tp, nkv/tp).
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(source).view(B, Tk, -1, self.head_dim).transpose(1, 2)  # (B, nkv, Tk, hd)
        v = self.v_proj(source).view(B, Tk, -1, self.head_dim).transpose(1, 2)  # (B, nkv, Tk, hd)
        if self.q_norm is not None:  # before RoPE as in Qwen3: the per-channel scale does not commute with RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if is_block_mask(allowed):  # data.document_mask on CUDA: the kernel that skips the masked blocks
            attention = flex_document_attention
        else:
            attention = matmul_attention if use_matmul_attention(self.kernel, x) else sdpa_attention
        dropout = self.dropout if self.training else 0.0
        if self.ulysses is not None:  # T is this rank's slice; causal self-attention runs on the whole sequence
            y = self.ulysses(q, k, v, attention, dropout, allowed)  # (B, nh, T, hd)
        else:
            y = attention(q, k, v, dropout, self.causal, bias, allowed)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Llama: down(silu(gate(x)) * up(x))), GeGLU (T5 v1.1: down(gelu(gate(x)) * up(x))) or GELU
    (GPT-2: down(gelu(up(x)))); GELU is the tanh approximation throughout (HF's "gelu_new")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.act = F.silu if cfg.mlp == "swiglu" else _gelu_tanh
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.down_proj.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)  # (B, T, d_ff)
        else:
            h = self.act(self.up_proj(x))  # (B, T, d_ff)
        return self.down_proj(h)  # (B, T, C)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT, Touvron et al. 2021), initialised small so
    each block starts close to the identity."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class Block(nn.Module):
    """Self-attention, then (in an encoder-decoder's decoder) cross-attention to the encoder output, then the MLP;
    each sub-layer f a residual branch, optionally LayerScaled:
        pre-norm   x + f(norm(x))
        post-norm  norm(x + f(x))     the original "Add & Norm" (Vaswani et al. 2017)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True, cross: bool = False, mlp: nn.Module | None = None):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        if cross:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = Attention(cfg, causal=False)
        self.mlp_norm = make_norm(cfg)
        self.mlp = mlp if mlp is not None else MLP(cfg)  # given: a Mixture-of-Experts MLP (model.moe)
        on = cfg.layerscale_init is not None
        self.attn_scale = LayerScale(cfg.d_model, cfg.layerscale_init) if on else nn.Identity()
        if cross:
            self.cross_scale = LayerScale(cfg.d_model, cfg.layerscale_init) if on else nn.Identity()
        self.mlp_scale = LayerScale(cfg.d_model, cfg.layerscale_init) if on else nn.Identity()
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.cross = cross

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, scale: nn.Module, f) -> torch.Tensor:
        if self.post_norm:
            return norm(x + scale(self.resid_dropout(f(x))))  # (B, T, C)
        return x + scale(self.resid_dropout(f(norm(x))))  # (B, T, C)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                bias: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        x = self._sublayer(x, self.attn_norm, self.attn_scale, lambda h: self.attn(h, rope, bias, allowed=allowed))
        if self.cross:
            x = self._sublayer(x, self.cross_norm, self.cross_scale, lambda h: self.cross_attn(h, None, memory=memory))
        return self._sublayer(x, self.mlp_norm, self.mlp_scale, self.mlp)


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """model.init=normal, GPT-2 / Llama: N(0, init_std); the projections that write into the residual stream are
    scaled by 1/sqrt(2 n_layers) so the stream's variance does not grow with depth (GPT-2 paper).
    model.init=xavier, the original Transformer's: Xavier-uniform linear weights, each residual branch as large as
    the stream it joins (what makes post-norm need warmup, Xiong et al. 2020), embeddings N(0, d_model^-0.5).
    Built under ZeRO-3's zero.Init, each module's weights are already partitioned here: they are gathered."""
    with gathered_for_init(list(module.parameters(recurse=False))):
        if isinstance(module, nn.Linear):
            if cfg.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                std = cfg.init_std
                if getattr(module, "is_residual_out", False):
                    std /= math.sqrt(2 * cfg.n_layers)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = cfg.d_model ** -0.5 if cfg.init == "xavier" else cfg.init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
