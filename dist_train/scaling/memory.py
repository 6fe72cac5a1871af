"""Bytes per GPU of a run: model states under each ZeRO stage, DeepSpeed's buffers, and activations.

Model states follow the ZeRO paper (Rajbhandari et al. 2020) with mixed-precision AdamW, K = 12 bytes of
optimizer state per parameter (fp32 master weights, momentum, variance), checked against what DeepSpeed
0.19 actually holds (tests/test_scaling.py sums the tensors of real engines):

    stage   weights       gradients    optimizer (fp32 master + m + v)
    0       p·Ψ           p·Ψ          12·Ψ      (fp32 runs: 8·Ψ, the weights are the master)
    1       p·Ψ           p·Ψ/N        12·Ψ/N    (full p·Ψ gradients exist during backward until reduced)
    2       p·Ψ           p·Ψ/N        12·Ψ/N
    3       p·Ψ/N + P     p·Ψ/N        12·Ψ/N    (P: parameters under stage3_param_persistence_threshold
                                                  stay whole on every rank)

with p the bytes of the working precision (2 for bf16/fp16, 4 for fp32), Ψ parameters and N GPUs.
Mixture-of-Experts (model.moe, ZeRO 0-2): a rank holds the dense parameters Ψd and its share Ψe/E of the
experts (E = parallel.expert: num_experts/E whole experts per MoE layer), and DeepSpeed partitions the experts'
gradients and optimizer states over the N/E ranks that hold the same experts (the expert-data-parallel group):
a partition is Ψd/N + (Ψe/E)/(N/E) = Ψ/N, as for a dense model. Expert parallelism shrinks the terms with whole
copies (the weights, ZeRO-0's gradients and optimizer states, ZeRO-1's full gradients in backward), Ψ = Ψd + Ψe/E
there.
ZeRO >= 1 keeps an fp32 master partition even in fp32 runs. Under bf16 at ZeRO 1-3 the generated config sums
gradients in fp32: their partition takes 4·Ψ/N at ZeRO 2/3, and ZeRO-1 runs DeepSpeed's BF16_Optimizer, which
holds a whole fp32 gradient (4·Ψ) and no reduce bucket. DeepSpeed also allocates reduce buckets of
`reduce_bucket_size` elements (the generated config: 5e7 at ZeRO 1/2, where overlap_comm holds two, 5e8 at
ZeRO-3; at most Ψ) during backward (stages 1, 2) or for the whole run (stage 3), and the optimizer step
briefly holds the fp32 gradient partition (4·Ψ/N).

Activations are counted tensor by tensor from what `dist_train.model` saves for the backward pass with a
fused (flash) attention kernel and no dropout; tests check them against `saved_tensors_hooks`. Not yet for an
MoE model's MoE layers, which are counted as the dense MLP: a token's top_k experts, DeepSpeed's dispatch buffers
and the router save more (moe-tiny, 4 x 64 tokens: 23.2 MB saved against 13.0 MB counted), so `activations`
is low for MoE.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from dist_train.config import Config, ModelConfig, config_from_dict, data_parallel_size
from dist_train.engine.ds_config import TP_COLUMN_PATTERNS, TP_ROW_PATTERNS, deepspeed_config
from dist_train.model.blocks import SDPA_HAS_GQA

ADAM_BYTES = 8
"""AdamW momentum + variance, fp32."""
MASTER_BYTES = 4
"""fp32 master copy of the weights (mixed precision, or any ZeRO >= 1 run)."""
ALLREDUCE_BUCKET = 500_000_000
"""Elements per flattened all-reduce bucket of a ZeRO-0 engine (DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE)."""
DS_DEFAULTS = {"stage3_param_persistence_threshold": 100_000, "contiguous_gradients": True}
"""DeepSpeed 0.19 defaults of the zero_optimization keys that size buffers, used when ds_config omits them
(reduce_bucket_size: the generated ds_config always sets it, see config.reduce_bucket_size)."""


def precision_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (CPU bytes per rank where offloaded). `peak` adds everything that can coexist."""

    weights: int
    gradients: int
    optimizer_states: int
    buffers: int
    """DeepSpeed reduce buckets (and ZeRO-3's gathered largest layer): allocated whatever the model size."""
    backward_transient: int
    """During backward: ZeRO-1's full-size gradients beyond the partition it keeps; ZeRO-0's flattened
    all-reduce copy."""
    step_transient: int
    """The fp32 gradient partition that exists only inside the optimizer step."""
    activations: int
    activations_checkpointed: int
    cpu_offloaded: int
    """Optimizer states and fp32 gradients kept in CPU memory per rank (offload_optimizer)."""

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer_states

    def peak(self, checkpointing: bool) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.model_states + self.buffers + max(acts + self.backward_transient, self.step_transient)

    def to_dict(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        out.update(model_states=self.model_states, peak=self.peak(False),
                   peak_checkpointed=self.peak(True))
        return out


# ---------------------------------------------------------------------------------------------------------
# Activations: bytes saved for the backward pass, per token of a micro-batch.

def _norm_saved(m: ModelConfig, p: int) -> int:
    if m.norm == "layernorm":
        return p * m.d_model + 8  # input, fp32 mean and rstd per token
    # RMSNorm in fp32: the fp32 input (a copy unless p = 4), 1/rms, and the normalised output cast back.
    return 4 * m.d_model + 4 + p * m.d_model


def _qk_norm_saved(m: ModelConfig, p: int, tensor: int = 1) -> tuple[int, int]:
    """(per query token, per key token) bytes the q and k norms (model.qk_norm) save: RMSNorm's per head, over a
    1/tensor share of the heads. Their input, q_proj's or k_proj's output, is saved by nothing else."""
    if not m.qk_norm:
        return 0, 0
    return ((4 + p) * m.d_model // tensor + 4 * m.n_heads // tensor,
            (4 + p) * m.kv_heads * m.head_dim // tensor + 4 * m.kv_heads // tensor)


def activation_bytes_per_token(m: ModelConfig, precision: str, tensor: int = 1,
                               sequence: int = 1) -> tuple[int, int]:
    """(per layer, outside the layers) bytes saved per token by `dist_train.model`, on one of `tensor`
    tensor-parallel ranks (which hold nh/tensor heads and d_ff/tensor MLP features; norms stay whole). Under
    sequence parallelism the attention kernel's output is kept apart from o_proj's input: the all-to-all
    between them makes a new tensor (without it o_proj's input is a view of it)."""
    if m.hf_config:
        raise ValueError("activation memory is counted for dist_train's own model, not for model.hf_config")
    p, d, f, t = precision_bytes(precision), m.d_model, m.d_ff, tensor
    # Attention: the normed input, q and k after RoPE, v, the output (a 1/t share of the heads on a
    # tensor-parallel rank), and the fp32 log-sum-exp per head; the q/k norms' own. With grouped-query attention
    # SDPA takes k and v at n_kv_heads (enable_gqa); before torch 2.5 they are repeated to n_heads.
    kv = m.kv_heads * m.head_dim if SDPA_HAS_GQA else d
    attn = p * d + p * (2 * d + 2 * kv) // t + 4 * m.n_heads // t + (p * d // t if sequence > 1 else 0)
    attn += sum(_qk_norm_saved(m, p, t))
    # MLP: the normed input, then swiglu gate, silu(gate), up and their product; gelu input and output.
    mlp = p * (d + 4 * f // t) if m.mlp in ("swiglu", "geglu") else p * (d + 2 * f // t)
    layerscale = 2 * p * d if m.layerscale_init is not None else 0
    per_layer = 2 * _norm_saved(m, p) + attn + mlp + layerscale
    # Head: final norm, lm_head input, fp32 log-softmax output, the int64 input ids and labels.
    head = _norm_saved(m, p) + p * d + 4 * m.vocab_size + 16
    return per_layer, head


def activation_bytes(m: ModelConfig, precision: str, micro_batch: int, checkpointing: bool, tensor: int = 1,
                     sequence: int = 1) -> int:
    """Peak activation bytes of one micro-batch on one rank: what is saved, plus the loss's transient logits
    (the logits in p bytes and their fp32 copy) and, with recomputation, one block's activations at a time.
    A sequence-parallel rank holds seq_len/`sequence` tokens (Ulysses' attention over the whole sequence with
    heads/`sequence` saves as much as over the slice with all heads); a tensor-parallel rank holds all tokens
    with a share of the heads and MLP features."""
    if m.arch == "encoder_decoder":  # tensor / sequence parallelism are refused for it (config validation)
        return _encoder_decoder_activations(m, precision, micro_batch, checkpointing)
    per_layer, head = activation_bytes_per_token(m, precision, tensor, sequence)
    tokens = m.seq_len // sequence
    p = precision_bytes(precision)
    loss_transient = (p + 4) * m.vocab_size
    if checkpointing:
        per_token = m.n_layers * p * m.d_model + per_layer + head + loss_transient
    else:
        per_token = m.n_layers * per_layer + head + loss_transient
    rope_tables = 2 * tokens * m.head_dim * p if m.pos == "rope" else 0
    return micro_batch * tokens * per_token + rope_tables


def _encoder_decoder_activations(m: ModelConfig, precision: str, micro_batch: int, checkpointing: bool,
                                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> int:
    """The encoder's layers over Le tokens; the decoder's over Ld tokens, each with a cross-attention (its norm,
    q, output, log-sum-exp per decoder token; k and v per encoder token) reading the encoder output; the head
    and the loss over Ld tokens; T5's bias tables (1, nh, T, T): the encoder's, and per decoder layer its causal
    sum with the mask."""
    from dist_train.data.span_corruption import span_lengths

    lengths = span_lengths(m.seq_len, noise_density, mean_noise_span_length)
    le, ld = lengths.encoder, lengths.decoder
    per_layer, head = activation_bytes_per_token(m, precision)
    p, d = precision_bytes(precision), m.d_model
    q_norm, k_norm = _qk_norm_saved(m, p)
    cross = _norm_saved(m, p) + 3 * p * d + 4 * m.n_heads + (p * d if m.layerscale_init is not None else 0) + q_norm
    kv = m.kv_heads * m.head_dim if SDPA_HAS_GQA else d
    cross_kv = 2 * p * kv + k_norm  # per encoder token and decoder layer: k and v, as for self-attention
    encoder_layer, decoder_layer = le * per_layer, ld * (per_layer + cross) + le * cross_kv
    outside = le * (_norm_saved(m, p) + p * d) + ld * (head + (p + 4) * m.vocab_size)  # + the encoder output
    if checkpointing:  # each block's input, and one decoder block's activations at a time
        layers = m.n_layers * p * d * (le + ld) + decoder_layer
    else:
        layers = m.n_layers * (encoder_layer + decoder_layer)
    tables = p * m.n_heads * (le * le + m.n_layers * ld * ld) if m.pos == "relative" else 0
    rope_tables = 2 * 2 * max(le, ld) * m.head_dim * p if m.pos == "rope" else 0
    return micro_batch * (layers + outside) + tables + rope_tables


# ---------------------------------------------------------------------------------------------------------
# Model states

def _meta_model_sizes(m: ModelConfig, expert: int = 1) -> tuple[list[tuple[str, int, bool]], int]:
    """((name, element count, whether an expert's) of every distinct parameter, parameters of the largest module)
    of the model one of `expert` expert-parallel ranks builds (its num_experts / expert experts per MoE layer), on
    the meta device (no memory). Cached per shape: `plan --gpu-memory` estimates one model in many settings."""
    key = json.dumps([dataclasses.asdict(dataclasses.replace(m, grad_checkpointing=False)), expert], sort_keys=True)
    if key not in _META_SIZES:
        from dist_train.model.build import build_model
        from dist_train.model.moe import is_expert_parameter

        with torch.device("meta"):
            model = build_model(m, expert_parallel=(expert, 0))
        largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
        _META_SIZES[key] = ([(name, p.numel(), is_expert_parameter(p)) for name, p in model.named_parameters()],
                            largest)
    return _META_SIZES[key]


_META_SIZES: dict[str, tuple[list[tuple[str, int, bool]], int]] = {}


def parameter_numels(m: ModelConfig, tensor: int = 1, expert: int = 1) -> list[tuple[int, bool]]:
    """(element count, whether an expert's) of every distinct parameter on one rank of `tensor` tensor-parallel
    and `expert` expert-parallel ranks, from the model built on the meta device (no memory). AutoTP splits the
    layers `tensor_parallel_split` names; the others stay whole on every rank. An expert-parallel rank holds
    num_experts / expert whole experts of each MoE layer."""
    return [(numel // tensor if tensor_parallel_split(name, m) else numel, is_expert)
            for name, numel, is_expert in _meta_model_sizes(m, expert)[0]]


def tensor_parallel_split(name: str, m: ModelConfig) -> bool:
    """Whether AutoTP splits parameter `name`: our column-parallel layers' weights and biases, row-parallel
    weights (their biases are added whole after the all-reduce). For an hf_config model: the Linear weights
    inside its decoder layers (transformers' tensor-parallel plans for Llama-like models)."""
    if m.hf_config:
        return ".layers." in name and name.endswith("proj.weight")
    module, _, kind = name.rpartition(".")
    weight = module + ".weight"
    if any(re.match(pattern, weight) for pattern in TP_COLUMN_PATTERNS):
        return True
    return kind == "weight" and any(re.match(pattern, weight) for pattern in TP_ROW_PATTERNS)


def _largest_layer(m: ModelConfig) -> int:
    """Parameters of the largest module, which ZeRO-3 gathers whole (DeepSpeed's estimator's notion)."""
    return _meta_model_sizes(m)[1]


def _zero_settings(ds_config: dict[str, Any]) -> dict[str, Any]:
    zero = dict(DS_DEFAULTS)
    zero.update(ds_config["zero_optimization"])
    zero.setdefault("overlap_comm", False)  # DeepSpeed's default below ZeRO-3 (where it does not size buffers)
    return zero


def _partition_bytes(nbytes: int, dense: int, experts: int, n: int, expert: int) -> int:
    """Bytes of one rank's ZeRO partition at `nbytes` per parameter: the `dense` parameters are partitioned over
    all `n` data-parallel ranks, this rank's `experts` over the n / `expert` ranks that hold the same experts
    (DeepSpeed's expert-data-parallel group)."""
    return nbytes * dense // n + nbytes * experts // (n // expert)


def estimate_memory(cfg: Config, gpus: int) -> MemoryEstimate:
    """Per-GPU bytes of `cfg` on `gpus` GPUs (stage, offload, precision, micro-batch, parallel.*: cfg).

    Tensor parallelism (AutoTP) leaves each rank its share of the split layers, and ZeRO partitions that over
    the data-parallel ranks (gpus / tensor). Sequence parallelism leaves the parameters whole and ZeRO
    partitions over all ranks (DeepSpeed's sequence-data-parallel group), while each rank's activations are
    those of seq_len / sequence tokens. Expert parallelism (an MoE model) leaves each rank num_experts /
    parallel.expert experts per MoE layer, partitioned over the ranks holding the same ones (module doc)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    m, ds, par = cfg.model, cfg.deepspeed, cfg.parallel
    data_parallel_size(cfg, gpus)  # refuses a GPU count the tensor/sequence groups do not divide
    stage, p, n = ds.zero_stage, precision_bytes(cfg.precision), gpus // par.tensor
    ds_config = deepspeed_config(cfg, gpus)
    zero = _zero_settings(ds_config)
    numels = parameter_numels(m, par.tensor, par.expert)
    psi_experts = sum(k for k, is_expert in numels if is_expert)  # this rank's experts
    psi_dense = sum(k for k, is_expert in numels if not is_expert)
    psi = psi_dense + psi_experts  # parameters this rank holds whole
    partition = functools.partial(_partition_bytes, dense=psi_dense, experts=psi_experts, n=n, expert=par.expert)
    master = 0 if (stage == 0 and cfg.precision == "fp32") else MASTER_BYTES

    if stage < 3:
        weights = p * psi
    else:
        persistent = sum(k for k, _ in numels if k < zero["stage3_param_persistence_threshold"])
        weights = partition(p) + p * persistent
    # Gradients are summed in fp32 under bf16 at ZeRO 1-3 (ds_config data_types.grad_accum_dtype).
    fp32_sums = stage >= 1 and "data_types" in ds_config
    g = 4 if fp32_sums else p
    bf16_optimizer = fp32_sums and stage == 1 and not ds.offload_optimizer  # DeepSpeed's BF16_Optimizer
    gradients = p * psi if stage == 0 else g * psi if bf16_optimizer else partition(g)
    sharded_states = stage >= 1
    optimizer = partition(ADAM_BYTES + master) if sharded_states else (ADAM_BYTES + master) * psi
    # DeepSpeed's data-parallel all-reduce flattens the gradients in buckets of at most 5e8 elements, the dense
    # ones first, then the experts' (over their own group).
    allreduce_bucket = max(min(psi_dense, ALLREDUCE_BUCKET), min(psi_experts, ALLREDUCE_BUCKET))
    if stage == 0:
        backward_transient = p * allreduce_bucket if n > 1 else 0
    else:  # ZeRO-1 holds full gradients until the reduce at the accumulation boundary
        backward_transient = p * psi - partition(p) if stage == 1 and not bf16_optimizer else 0
    step_transient = (partition(4) if sharded_states else 4 * psi) if master else 0
    if bf16_optimizer and n > 1:  # before its step, the fp32 all-reduce flattens the gradients in 5e8-element buffers
        step_transient = max(step_transient, 4 * allreduce_bucket)
    buffers = _buffer_bytes(m, zero, stage, p, g, bf16_optimizer)
    cpu = 0
    if ds.offload_optimizer:  # DeepSpeed keeps the states and the fp32 gradient partition on the CPU
        cpu = optimizer + partition(4)
        optimizer, step_transient = 0, 0
        gradients = 0 if stage < 3 else gradients
    if ds.offload_params:
        cpu += weights
        weights = 0

    micro = cfg.train.micro_batch_size
    acts = activation_bytes(m, cfg.precision, micro, False, par.tensor, par.sequence)
    acts_ckpt = activation_bytes(m, cfg.precision, micro, True, par.tensor, par.sequence)
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer_states=optimizer, buffers=buffers,
                          backward_transient=backward_transient, step_transient=step_transient,
                          activations=acts, activations_checkpointed=acts_ckpt, cpu_offloaded=cpu)


def _buffer_bytes(m: Any, zero: dict[str, Any], stage: int, p: int, g: int, bf16_optimizer: bool) -> int:
    """ZeRO-1/2 double-buffer the reduce bucket when overlap_comm is on; ZeRO-3 allocates one at init, in fp32
    where it reduces in fp32 (fp32 sums), and holds the gathered layer and its gradient. The BF16_Optimizer keeps
    no bucket (its all-reduce buffers are a step transient)."""
    bucket_bytes = (zero["reduce_bucket_size"] * (g if stage == 3 else p)
                    * (2 if zero["overlap_comm"] and stage < 3 else 1))
    buffers = bucket_bytes if stage >= 1 and zero["contiguous_gradients"] and not bf16_optimizer else 0
    if stage == 3:
        buffers += 2 * p * _largest_layer(m)  # the gathered layer and its gradient
    return buffers


def with_overrides(cfg: Config, zero_stage: int | None = None, offload_optimizer: bool | None = None,
                   micro_batch: int | None = None, precision: str | None = None, tensor: int | None = None,
                   sequence: int | None = None, expert: int | None = None) -> Config:
    """cfg with the memory command's flags applied (None keeps the config's value)."""
    tree = cfg.to_dict()
    for key, value in (("tensor", tensor), ("sequence", sequence), ("expert", expert)):
        if value is not None:
            tree["parallel"][key] = value
    if zero_stage is not None:
        tree["deepspeed"]["zero_stage"] = zero_stage
    if offload_optimizer is not None:
        tree["deepspeed"]["offload_optimizer"] = offload_optimizer
    if micro_batch is not None:
        tree["train"]["micro_batch_size"] = micro_batch
    if precision is not None:
        tree["precision"] = precision
    return config_from_dict(tree)  # validated: e.g. offload needs ZeRO >= 1
