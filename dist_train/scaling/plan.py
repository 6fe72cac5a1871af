"""From a budget to a run: compute-optimal N and D under each published law, a concrete model shape whose
exact parameter count is within 5 % of the chosen N, the training time, and a config `launch/train.py`
accepts as is.

A Mixture-of-Experts base config (model.moe) is planned by its *active* parameters: N of the laws is what a token
uses (the shape's experts, router and shared experts kept from the base; `dist_train.model.count`), as C = 6ND
counts the FLOPs of an MoE model. The laws were fitted on dense models: at the same active N and D an MoE model
reaches a lower loss than they predict (Clark et al. 2022, Unified Scaling Laws for Routed Language Models), so
the plan is the compute-optimal dense run's compute, tokens and time, with the experts added on top; the
memory (all experts) is sized by `plan --gpu-memory` / `scaling memory`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from dist_train.config import Config, ConfigError, ModelConfig, config_from_dict, resolve_grad_accum
from dist_train.model.count import count_params, flops_per_token
from dist_train.scaling.laws import DEFAULT_LAW, LAWS, training_hours

SHAPE_TOLERANCE = 0.05
"""A proposed shape's exact parameter count is within this relative distance of the target N."""

FRESH_EPOCHS = 4
"""Muennighoff et al. 2023 (Scaling Data-Constrained Language Models): up to ~4 epochs of repeated data train
almost as well as fresh data; beyond, each repetition is worth less (a decay constant of ~15 epochs in their
fit) and extra compute eventually buys nothing."""


def head_dim_for(d_model: int) -> int:
    """64 below d_model 1280 and 128 from there, as in Chinchilla's model family (Hoffmann et al. Table A9);
    GPT-2/GPT-3 use 64 and Llama 128 at the sizes they publish."""
    return 64 if d_model < 1280 else 128


def d_ff_for(d_model: int, mlp: str) -> int:
    """GELU: 4·d_model (GPT-2, Chinchilla). SwiGLU: 8/3·d_model so the three matrices cost what GELU's two
    do, rounded up to a multiple of 256 like Llama (Llama-2-7B: 4096 -> 11008); 64 below d_model 1024."""
    if mlp == "gelu":
        return 4 * d_model
    multiple = 256 if d_model >= 1024 else 64
    return multiple * math.ceil(8 * d_model / 3 / multiple)


def target_aspect_ratio(params: float) -> float:
    """d_model / n_layers of published models grows with size: ~64 at 100M (GPT-2 small, Chinchilla's small
    models), ~100-128 at 7B-70B (Llama, Chinchilla 70B). Interpolated in log(params), clamped."""
    t = (math.log10(max(params, 1e8)) - 8.0) / (10.0 - 8.0)
    return 64.0 * 2.0 ** min(max(t, 0.0), 1.0)


def _kv_group(base: ModelConfig) -> int:
    """Query heads per key/value head in `base` (1 without grouped-query attention)."""
    return base.n_heads // base.kv_heads


def _shape(base: ModelConfig, d_model: int, n_layers: int) -> ModelConfig:
    n_heads = d_model // head_dim_for(d_model)
    group = _kv_group(base)
    n_kv_heads = max(1, n_heads // group) if base.n_kv_heads is not None else None
    return dataclasses.replace(base, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=n_kv_heads, d_ff=d_ff_for(d_model, base.mlp), hf_config=None)


def planned_params(cfg: ModelConfig) -> int:
    """The N a plan sizes: all parameters of a dense model, the active ones of an MoE model (module doc)."""
    return count_params(cfg).active


def shape_for_params(target: float, base: ModelConfig, tolerance: float = SHAPE_TOLERANCE) -> ModelConfig:
    """The shape (n_layers, d_model, n_heads, d_ff) of `base`'s family whose exact count (`planned_params`: active
    parameters for an MoE model) is within `tolerance` of `target` and whose depth-to-width ratio is closest to
    published models of that size. Vocabulary, sequence length, the norm/position/MLP/bias/tie options and
    model.moe are kept from `base` (at least model.moe.every layers, so that one has an MoE MLP)."""
    embedding_only = count_params(dataclasses.replace(_shape(base, 64, 1), n_layers=0)).total
    if target < embedding_only:
        raise ValueError(f"a {target:.3g}-parameter model cannot hold the embedding of vocab_size "
                         f"{base.vocab_size} (at least {embedding_only:,} parameters at d_model 64): "
                         f"use a smaller vocabulary or a larger budget")
    aspect = target_aspect_ratio(target)
    best: tuple[float, float, ModelConfig] | None = None
    for d_model in range(64, 32768 + 1, 64):
        if d_model % head_dim_for(d_model) or (d_model // head_dim_for(d_model)) % _kv_group(base):
            continue  # whole heads, and whole kv groups when the base uses grouped-query attention
        for n_layers in range(base.moe.every if base.moe.enabled else 1, 257):
            cfg = _shape(base, d_model, n_layers)
            error = planned_params(cfg) / target - 1.0
            if error > tolerance:
                break  # deeper only grows the count
            if error < -tolerance:
                continue
            key = (abs(math.log(d_model / n_layers / aspect)), abs(error))
            if best is None or key < best[:2]:
                best = (*key, cfg)
    if best is None:
        raise ValueError(f"no shape of this family has {target:.4g} parameters within {tolerance:.0%}")
    return best[2]


def allocations(compute: float | None = None, params: float | None = None,
                tokens: float | None = None) -> list[dict[str, Any]]:
    """Each published law's compute-optimal (C, N, D), given exactly one of C, N or D."""
    if sum(x is not None for x in (compute, params, tokens)) != 1:
        raise ValueError("give exactly one of compute, params or tokens")
    rows = []
    for law in LAWS.values():
        try:
            if compute is None:
                c = law.compute_for_params(params) if params is not None else law.compute_for_tokens(tokens)
            else:
                c = compute
            rows.append(law.allocation(c))
        except OverflowError:  # a power of a budget past ~1e154
            given = next(f"{name} {v:g}" for name, v in (("compute", compute), ("params", params),
                                                         ("tokens", tokens)) if v is not None)
            raise ValueError(f"{given}: the compute-optimal allocation of this budget overflows a float; "
                             f"size a smaller run") from None
    return rows


def plan(base: Config, compute: float | None = None, params: float | None = None, tokens: float | None = None,
         method: str = DEFAULT_LAW, gpus: int = 1, peak_tflops: float = 989.0, mfu: float = 0.4) -> dict[str, Any]:
    """The whole plan: every law side by side, the chosen law's shape, its run length and duration."""
    if method not in LAWS:
        raise ValueError(f"--method must be one of {', '.join(LAWS)}, got {method!r}")
    rows = allocations(compute, params, tokens)
    chosen = next(r for r in rows if r["method"] == method)
    n_target = params if params is not None else chosen["params"]
    d_target = tokens if tokens is not None else chosen["tokens"]
    model = shape_for_params(n_target, base.model)
    count = count_params(model)
    n_planned = planned_params(model)
    run_tokens = round(d_target)
    run_flops = flops_per_token(model) * run_tokens
    return {
        "laws": rows, "method": method, "target_params": n_target, "target_tokens": d_target,
        "shape": {k: getattr(model, k) for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff",
                                                 "vocab_size", "seq_len", "norm", "pos", "mlp", "bias",
                                                 "tie_embeddings")},
        "params": dataclasses.asdict(count), "params_error": n_planned / n_target - 1.0,
        "sized_by": "active" if model.moe.enabled else "total",
        "moe": dataclasses.asdict(model.moe) if model.moe.enabled else None,
        "tokens": run_tokens, "tokens_per_param": run_tokens / n_planned,
        "flops_per_token": flops_per_token(model), "run_flops": run_flops,
        "gpus": gpus, "peak_tflops": peak_tflops, "mfu": mfu,
        "hours": training_hours(run_flops, gpus, peak_tflops, mfu),
        "gpu_hours": training_hours(run_flops, 1, peak_tflops, mfu),
    }


def data_sources(cfg: Config) -> list[dict[str, Any]]:
    """The training data the config names: per source its path, share of samples, training tokens and
    vocabulary (from its manifest.json). Empty without data."""
    from dist_train.formats.manifest import read_manifest

    paths = cfg.data.weighted_paths()
    total_weight = sum(w for _, w in paths)
    sources = []
    for path, weight in paths:
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.path: {e}") from None
        sources.append({"path": path, "share": weight / total_weight, "vocab_size": manifest["vocab_size"],
                        "train_tokens": manifest["splits"]["train"]["num_tokens"]})
    return sources


def vocab_for_data(sources: list[dict[str, Any]]) -> int:
    """Embedding rows for the data's tokenizer: its vocabulary rounded up to a multiple of 64 (as preflight
    suggests; GPT-2's 50,257 -> 50,304)."""
    return -(-max(s["vocab_size"] for s in sources) // 64) * 64


def epochs_report(sources: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """How many times the planned tokens go through each source, and whether that is past fresh-data value."""
    rows = [{**s, "epochs": tokens * s["share"] / max(s["train_tokens"], 1)} for s in sources]
    most = max(r["epochs"] for r in rows)
    return {"sources": rows, "max_epochs": most, "repeats_too_much": most > FRESH_EPOCHS, "fresh_epochs": FRESH_EPOCHS,
            "fresh_tokens": FRESH_EPOCHS * min(r["train_tokens"] / r["share"] for r in rows)}


def planned_config(base: Config, result: dict[str, Any], world_size: int, out_dir: str | None = None) -> Config:
    """`base` with the planned model shape and enough steps for the planned tokens on `world_size`
    processes, training into `out_dir` (its own folder, not the base's); validated like any config the
    trainer loads."""
    tree = base.to_dict()
    tree["model"].update(result["shape"])
    tree["model"]["hf_config"] = None
    if out_dir is not None:
        tree["run"]["out_dir"] = out_dir
    t = tree["train"]
    tokens_per_step = (t["micro_batch_size"] * resolve_grad_accum(base, world_size) * world_size
                       * tree["model"]["seq_len"])
    t["max_steps"] = max(1, math.ceil(result["tokens"] / tokens_per_step))
    t["warmup_steps"] = min(t["warmup_steps"], t["max_steps"])
    return config_from_dict(tree)


def write_config(cfg: Config, path: str | Path, notes: dict[str, str] | None = None) -> Path:
    """Write the planned config; `notes` (setting -> where its value came from) become comments at the top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["# Written by `python -m dist_train.scaling plan`: a compute-optimal shape and run length."]
    header += [f"# {key}: {text}" for key, text in (notes or {}).items()]
    path.write_text("\n".join(header) + "\n" + cfg.to_yaml())
    return path
