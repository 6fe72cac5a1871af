"""The run config's schema: one dataclass per section, a one-line docstring per field, defaults that work.

Everything else (the DeepSpeed config, the model, the optimizer, the loader) is derived from it, so a user
never keeps two configs in sync (GPT-NeoX's rule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config the user must fix: the message names the key and what to do."""

    def __init__(self, message: str, keys: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)  # the dotted keys at fault: the loader names the override that set them


@dataclass
class MoEConfig:
    num_experts: int = 0
    """Experts per Mixture-of-Experts MLP (DeepSpeed's MoE layer); 0 = a dense model. Each expert is an MLP of
    model.d_ff (the model's mlp kind); range >= 0, and 1 is refused (a router over one expert is a dense MLP)."""
    top_k: int = 2
    """Experts each token is routed to; their outputs are weighted by the router's softmax renormalised over the
    k chosen (Mixtral's routing); at most num_experts; range > 0."""
    every: int = 1
    """An MoE MLP in every k-th block (blocks k-1, 2k-1, ...; 1 = every block, 2 = alternate dense and MoE as
    GShard and Switch do); the other blocks keep the dense MLP; range > 0."""
    capacity_factor: float = 0.0
    """0 = dropless (every token reaches its k experts, the default); else each expert takes at most
    capacity_factor x k x tokens / num_experts tokens of a micro-batch and drops the rest, as GShard and Switch do
    (a dropped token skips the MLP through the residual); range >= 0."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch/GShard: num_experts x sum of token share x mean router
    probability per expert, summed over MoE layers) added to the loss; range >= 0."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss (ST-MoE: mean over tokens of logsumexp(router logits)^2, summed over MoE
    layers) added to the loss: it keeps the router logits small; range >= 0."""
    shared_experts: int = 0
    """Always-on experts (DeepSeekMoE): a dense MLP of shared_experts x d_ff beside the routed experts, whose
    output is added to theirs; range >= 0."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class ModelConfig:
    arch: Literal["decoder", "encoder_decoder"] = "decoder"
    """`decoder`: a causal LM trained on next-token prediction; `encoder_decoder`: an encoder (bidirectional) and a
    decoder (causal, with cross-attention to the encoder) trained on T5 span corruption (data.noise_density)."""
    n_layers: int = 4
    """Number of Transformer blocks (for encoder_decoder: of each of the encoder and the decoder); range > 0."""
    d_model: int = 128
    """Width of the residual stream; range > 0."""
    n_heads: int = 4
    """Attention (query) heads; d_model must be divisible by it; range > 0."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (multi-head attention); range > 0."""
    d_ff: int = 512
    """Hidden width of the MLP (for swiglu: the width of each of the gate and up projections); range > 0."""
    vocab_size: int = 2048
    """Rows of the embedding table; must be >= the tokenizer's vocabulary; range > 0."""
    seq_len: int = 128
    """Tokens per training sequence (and the number of learned positions); range > 0."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer."""
    norm_position: Literal["pre", "post"] = "pre"
    """`pre`: x + f(norm(x)) with a final norm (GPT-2, Llama, T5); `post`: norm(x + f(x)), the original "Add &
    Norm" (Vaswani et al., BART), with the norm moved from the end to the embeddings. Post with model.init=xavier
    needs lr warmup (BENCHMARKS.md)."""
    pos: Literal["rope", "learned", "relative"] = "rope"
    """Position encoding: rotary (Llama), a learned table (GPT-2, BART) or T5's bucketed relative attention bias
    (encoder_decoder only)."""
    mlp: Literal["swiglu", "geglu", "gelu"] = "swiglu"
    """MLP kind: gated SiLU (Llama), gated GELU (T5 v1.1) or GELU (GPT-2)."""
    bias: bool = False
    """Biases in linear layers and norms."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings; range in [0, 1)."""
    layerscale_init: float | None = None
    """Initial value of per-channel LayerScale on each residual branch; None turns LayerScale off; range > 0."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    attention: Literal["auto", "sdpa", "matmul", "flex"] = "auto"
    """Attention kernel: `sdpa` (torch's scaled_dot_product_attention: the flash kernel on GPU), `matmul` (two
    batched matmuls and an fp32 softmax: faster than torch's CPU flash kernel in bf16 for short sequences, but
    seq_len^2 memory), `flex` (data.document_mask only: compiled FlexAttention with a block mask that skips the
    masked blocks; CUDA, no dropout, heads of 16 or more), `auto` (flex for the document mask on CUDA where it can
    run; matmul for bf16/fp16 on the CPU up to 128 tokens; else sdpa). Same math."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers (the q/k norms' too); range > 0."""
    qk_norm: bool = False
    """RMSNorm each head's query and key over head_dim (one learnable gain, starting at 1, for all query heads and
    one for all key heads) after the projections and before RoPE: Qwen3's and Gemma 3's per-head form of the q/k
    norm of OLMo 2 and Chameleon. It bounds the attention logits, which can otherwise grow at high learning rates
    until the softmax saturates. Exports as Qwen3ForCausalLM."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies; range > 0."""
    init: Literal["normal", "xavier"] = "normal"
    """Weight init. `normal`: N(0, init_std), with the projections that write into the residual stream scaled by
    1/sqrt(2*n_layers) (GPT-2, Llama, nanoGPT); the down-scaled branches also tame post-norm. `xavier`: the
    original Transformer's (Vaswani et al. 2017, as fairseq and tensor2tensor build it): Xavier-uniform linear
    weights with no depth scaling and embeddings N(0, d_model^-0.5); init_std is then unused."""
    init_std: float = 0.02
    """Std of the normal init (model.init=normal); residual output projections are scaled by 1/sqrt(2*n_layers);
    range > 0."""
    hf_config: str | None = None
    """Path to a `transformers` config (folder or config.json): train that architecture instead (built with
    `AutoModelForCausalLM.from_config`, or `AutoModelForSeq2SeqLM` for model.arch=encoder_decoder; no download).
    The shape fields above are then ignored."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts MLPs (model.moe.num_experts > 0), with expert parallelism over parallel.expert ranks."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SourceConfig:
    path: str
    """A shard folder made by `python -m data_prep.shard` (holds manifest.json)."""
    weight: float = 1.0
    """Relative share of training samples drawn from this source; range > 0."""


@dataclass
class DataConfig:
    path: str | None = None
    """One shard folder (holds manifest.json). Use either this or `sources`."""
    sources: list[SourceConfig] | None = None
    """Several shard folders mixed by weight: [{path, weight}, ...]."""
    num_workers: int = 0
    """Read training batches ahead in a background thread, 2 per worker (0 reads them in the training loop);
    range >= 0."""
    noise_density: float = 0.15
    """model.arch=encoder_decoder: fraction of each window's tokens masked by span corruption (T5); range in
    (0, 1)."""
    mean_noise_span_length: float = 3.0
    """model.arch=encoder_decoder: mean length of a masked span, in tokens (T5); range >= 1."""
    document_mask: bool = False
    """Mask attention to each document of a packed window (Llama 3's): a token attends only to the tokens after
    the window's last EOS before it (an EOS ends its own document), and positions (RoPE or learned) restart at 0
    at each document start; every next-token loss still counts. Decoder-only models of our own (not
    model.arch=encoder_decoder, not model.hf_config)."""

    def weighted_paths(self) -> list[tuple[str, float]]:
        if self.sources:
            return [(s.path, s.weight) for s in self.sources]
        return [(self.path, 1.0)] if self.path else []


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to train for; range > 0."""
    micro_batch_size: int = 8
    """Sequences per process per forward pass; range > 0."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; range > 0."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all processes; when set, grad_accum_steps is derived from it and
    must come out whole (global = micro_batch_size * grad_accum_steps * data-parallel size, where the
    data-parallel size is world size / (parallel.tensor x parallel.sequence)); range > 0."""
    lr: float = 1e-3
    """Peak learning rate; range > 0."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay; range >= 0."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr; range >= 0."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Shape after warmup: cosine to min_lr, warmup-stable-decay, or constant lr."""
    decay_fraction: float = 0.2
    """For the wsd schedule: the final fraction of steps that decays linearly to min_lr; range in (0, 1]."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases and embeddings); range >= 0."""
    beta1: float = 0.9
    """AdamW beta1; range in [0, 1)."""
    beta2: float = 0.95
    """AdamW beta2; range in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon; range > 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off); range >= 0."""
    z_loss: float = 0.0
    """Weight of PaLM's z-loss (1e-4 there; 0 turns it off): this times the mean over the loss's tokens of
    log(Z)^2, Z the softmax normaliser of the output logits, is added to the loss so that log Z stays near 0
    instead of drifting (logged apart as z_loss, the unweighted mean; the logged loss stays the cross-entropy);
    range >= 0."""
    seed: int = 1234
    """Seed of the model init and the data order; range in [0, 4294967295]."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (0 turns it off) and at the end; range >= 0."""
    eval_steps: int = 10
    """Validation micro-batches per evaluation; range > 0."""
    log_every: int = 10
    """Write a metrics line every this many steps; range > 0."""
    compile: bool = False
    """torch.compile the model (fuses element-wise ops and the loss; the first step pays the compilation)."""
    tf32: bool = True
    """On CUDA, let fp32 matmuls use TensorFloat-32 tensor cores (10-bit mantissa inputs, fp32 accumulation;
    ~8x the fp32 rate on A100/H100): what `precision=fp32` runs get, and the fp32 matmuls of bf16/fp16 runs.
    false keeps full fp32 (IEEE) matmuls. No effect on the CPU."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each one is skipped, not applied); range > 0."""
    max_rollbacks: int = 0
    """Loss-spike rollbacks allowed per run (0 turns detection off): back to the last checkpoint before the
    spike, skipping the data read since it (dist_train/train/spikes.py); range >= 0."""
    spike_window: int = 20
    """Steps in the rolling mean loss that a spike is measured against; range > 0."""
    spike_margin: float = 1.0
    """Nats above the rolling mean that make a step's loss suspect; range > 0."""
    spike_steps: int = 3
    """Suspect steps in a row that make a spike (fewer are a blip and are kept); range > 0."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters);
    range 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the optimizer step) on the CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (ZeRO 3 only)."""
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """Under precision=bf16 at ZeRO 1-3: the dtype the micro-batches' gradients are summed in, and averaged over
    the data-parallel ranks in. fp32 (Megatron's and torchtitan's choice) keeps every micro-batch's and every
    rank's contribution; bf16 (DeepSpeed's default) saves memory and half the gradient traffic but rounds each
    sum to 8 mantissa bits. At ZeRO-1, fp32 runs DeepSpeed's BF16_Optimizer (an fp32 gradient per
    parameter), and a bf16 ZeRO-1 run cannot resume with another value. ZeRO-0 always sums in bf16 (DeepSpeed
    0.19 has no fp32 accumulation without ZeRO); ignored for fp32 and fp16."""
    fp16_initial_scale_power: int = 16
    """Under precision=fp16: the dynamic loss scale starts at 2 ** this (DeepSpeed's and Megatron's 2 ** 16 by
    default). A step whose scaled gradients overflow is skipped and halves the scale (at ZeRO 1-3 DeepSpeed's
    hysteresis of 2 spares the first halving); 1000 clean steps double it. Overflows are the scaler at work, not
    divergence: they are logged as overflow_steps and do not count towards train.max_bad_steps. Ignored for fp32
    and bf16; range in [0, 40]."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (DeepSpeed AutoTP): each layer's weights are split over this many consecutive ranks,
    which see the same micro-batches. ZeRO stage 0-2; n_heads and n_kv_heads must divide by it; range > 0."""
    sequence: int = 1
    """Sequence-parallel size (DeepSpeed-Ulysses): each sequence is cut into this many contiguous slices, one per
    consecutive rank, and attention trades the slices for heads by all-to-all. seq_len, n_heads and n_kv_heads
    must divide by it. The data-parallel size is world size / (tensor x sequence); range > 0."""
    expert: int = 1
    """Expert-parallel size (DeepSpeed MoE): each MoE layer's experts are split over this many consecutive
    data-parallel ranks, which trade tokens by all-to-all; it divides model.moe.num_experts and the
    data-parallel size. Expert weights are averaged over the data-parallel size / expert ranks; range > 0."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save a checkpoint every this many steps (0: only at the end and on a signal); range >= 0."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (0 keeps all); range >= 0."""
    async_save: bool = False
    """Write checkpoints in the background: training stops only to snapshot the state (a copy in host memory,
    once the size of the checkpoint), the files are written while it goes on and published (files.json,
    rename, `latest`) once every rank has written them. A kill before that leaves the previous `latest`."""
    verify: Literal["full", "sizes"] = "full"
    """Before loading a checkpoint, check every file against the size and sha256 written at save (full), or the
    sizes only (sizes: skips reading every byte once, misses bit rot)."""
    trust: bool = False
    """Load checkpoint files that need Python globals outside the safe allowlist (they may run code when read):
    only for checkpoints whose source you trust. Same as `--trust-checkpoint`."""
    resume_weights_only: bool = False
    """Where a checkpoint's optimizer state cannot be loaded by this run (an MoE checkpoint of another
    parallel.expert, or of parallel.expert > 1 under ZeRO 1-2 on another world size; refused otherwise), resume
    its weights (the experts re-split), step, data position and lr schedule, and start the optimizer state fresh,
    with a warning and a `weights_only_resume` event in metrics.jsonl. Elsewhere it changes nothing: a requeued
    job that keeps it resumes in full. Same as `--resume-weights-only`."""


@dataclass
class RunConfig:
    out_dir: str | None = None
    """Run folder: config, metrics, checkpoints, summary. Re-running into it resumes. Default: runs/<name of the
    config file> (runs/my_run for my_run.yaml), so each config trains into its own folder."""
    name: str | None = None
    """Human-readable run name (default: the run folder's name)."""
    lock: bool = True
    """Lock the run folder (flock on RUN/run.lock, rank 0) while training, so that a second run into it is refused.
    false only where the filesystem has no flock (Lustre without -o flock): then nothing stops a second run."""


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (rank 0 only)."""
    project: str = "dist_train"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None uses the default of the API key."""
    name: str | None = None
    """W&B run name; default: run.name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes locally (upload later with `wandb sync`), online needs an API key."""


@dataclass
class EvalConfig:
    """Downstream tasks of EleutherAI's lm-evaluation-harness during training (dist_train.train.task_eval)."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names (e.g. [hellaswag, arc_easy], or the offline [shakespeare_next_line, shakespeare_ppl] with
    include_path: configs/eval), run on each eval.every-th published checkpoint and at the end; [] = none."""
    every: int | None = None
    """Steps between task evaluations: a multiple of checkpoint.every (the published checkpoint is what is
    evaluated); None = checkpoint.every; range > 0."""
    limit: int | None = None
    """The first N documents of each task (None: all); keep an evaluation to minutes, the other ranks wait;
    range > 0."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (None: each task's own); range >= 0."""
    include_path: str | None = None
    """A folder of extra lm-eval task YAMLs (configs/eval holds the two offline tasks made from the corpus)."""
    batch_size: int = 16
    """lm-eval requests per forward pass; range > 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Mixed-precision mode: bf16, fp16 (CUDA only, dynamic loss scaling) or fp32."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_hash(self) -> str:
        """Hash of what a checkpoint's tensors depend on: a resume with another hash is refused."""
        shape = {k: v for k, v in dataclasses.asdict(self.model).items() if k in SHAPE_KEYS}
        if shape["arch"] == "decoder":
            del shape["arch"]  # checkpoints written before model.arch existed keep their hash
        if not shape["qk_norm"]:
            del shape["qk_norm"]  # likewise before model.qk_norm existed
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


# Model fields that change tensor shapes or the parameter set: changing one breaks a resume.
SHAPE_KEYS = ("arch", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "norm", "pos", "mlp",
              "bias", "tie_embeddings", "layerscale_init", "hf_config", "qk_norm")
