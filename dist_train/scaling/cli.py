"""Size a run before paying for it: `python -m dist_train.scaling {count,plan,memory,fit}`.

- count   exact parameter count and training FLOPs of a config (dist_train.model.count); for an MoE model
          also the parameters active per token, which the FLOPs (and the trainer's MFU) count
- plan    compute-optimal N and D under the published laws, a model shape and a config (plan)
- memory  bytes per GPU for weights, gradients, optimizer states and activations (memory)
- fit     fit L(N, D) = E + A/N^α + B/D^β to your own runs (fit)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from dist_train.config import (
    Config,
    ConfigError,
    add_override_arguments,
    load_config,
    overrides_from,
    parse_args_with_overrides,
)
from dist_train.config.loading import default_out_dir

NO_DATA = "<not needed for sizing>"


def load_sizing_config(path: str | Path | None, overrides: list[str]) -> Config:
    """A config for sizing: like `load_config`, but a missing data section is fine (nothing is read)."""
    # Sizing needs no data; a placeholder only satisfies the trainer's check that a data source is named.
    # An explicit data.path / data.sources in the file or the overrides is kept and validated as usual.
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        if "data.path is missing" not in str(e):
            raise
        return load_config(path, [*overrides, f"data.path={NO_DATA}"])


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


def count_report(cfg: Config, tokens: int | None) -> dict[str, Any]:
    from dist_train.model.count import count_params, flops_per_token, moe_layers

    m = cfg.model
    pc = count_params(m)
    per_token = flops_per_token(m, cfg.data.noise_density, cfg.data.mean_noise_span_length)
    moe = {"num_experts": m.moe.num_experts, "top_k": m.moe.top_k, "layers": moe_layers(m)} if m.moe.enabled else None
    return {"total": pc.total, "active": pc.active, "embedding": pc.embedding, "non_embedding": pc.non_embedding,
            "flops_params": pc.flops_params, "seq_len": m.seq_len, "flops_per_token": per_token,
            "tokens": tokens, "run_flops": per_token * tokens if tokens else None, "moe": moe}


def _count_text(r: dict[str, Any]) -> str:
    lines = [f"parameters      {r['total']:>18,}  ({_fmt_count(r['total'])})",
             f"  embedding     {r['embedding']:>18,}",
             f"  non-embedding {r['non_embedding']:>18,}",
             (f"FLOPs per token {r['flops_per_token']:>18,}  (6·{r['flops_params']:,} + attention at "
             f"seq_len {r['seq_len']})")]
    if r["moe"]:
        e = r["moe"]
        lines.insert(3, f"active per token{r['active']:>18,}  ({_fmt_count(r['active'])}: a token's top-{e['top_k']} "
                        f"of {e['num_experts']} experts in {e['layers']} MoE layers, router included)")
    if r["tokens"]:
        lines.append(f"run FLOPs       {r['run_flops']:>18.3e}  ({_fmt_count(r['tokens'])} tokens)")
    return "\n".join(lines)


def cmd_count(args: argparse.Namespace) -> None:
    cfg = load_sizing_config(args.config, overrides_from(args))
    r = count_report(cfg, args.tokens)
    _emit(r, args.json, _count_text(r))


# Without --config, plan for a bf16 Llama-family model with a real-world vocabulary (the tiny defaults of
# ModelConfig would make the embedding dominate any budget worth planning).
PLAN_DEFAULTS = ["model.vocab_size=32000", "model.seq_len=2048", "precision=bf16"]


def _plan_text(r: dict[str, Any]) -> str:
    lines = [(f"{'method':<11} {'a':>6} {'params N':>10} {'tokens D':>10} {'D/N':>6} {'C (6ND)':>10}  "
             f"{'loss':>5}  source")]
    for row in r["laws"]:
        loss = f"{row['loss']:.3f}" if row["loss"] is not None else "-"
        mark = "*" if row["method"] == r["method"] else " "
        lines.append(f"{row['method'] + mark:<11} {row['a']:>6.3f} {_fmt_count(row['params']):>10} "
                     f"{_fmt_count(row['tokens']):>10} {row['tokens_per_param']:>6.1f} "
                     f"{row['compute']:>10.3e}  {loss:>5}  {row['source']}")
    s = r["shape"]
    per = "active " if r["moe"] else ""
    kv = f", n_kv_heads {s['n_kv_heads']}" if s["n_kv_heads"] else ""
    lines += ["",
              (f"shape for {r['method']} (* above): n_layers {s['n_layers']}, d_model {s['d_model']}, "
              f"n_heads {s['n_heads']}{kv}, d_ff {s['d_ff']} (head dim {s['d_model'] // s['n_heads']}, "
              f"{s['mlp']}, vocab {s['vocab_size']}, seq_len {s['seq_len']})"),
              _plan_params_text(r),
              f"tokens          {r['tokens']:,} ({r['tokens_per_param']:.1f} per {per}parameter)",
              f"training FLOPs  {r['run_flops']:.3e} ({r['flops_per_token']:,} per token, attention included)",
              (f"time            {r['hours']:,.1f} h on {r['gpus']} GPU(s) at {r['mfu']:.0%} MFU of "
              f"{r['peak_tflops']:g} TFLOP/s ({r['gpu_hours']:,.0f} GPU-hours)")]
    if r.get("budget_hours") and abs(r["hours"] / r["budget_hours"] - 1) > 0.01:
        lines.append(f"note            {r['hours'] / r['budget_hours'] - 1:+.1%} against --hours: the laws budget "
                     f"C = 6ND, the run's FLOPs add attention and this shape's exact count")
    lines += _data_text(r)
    for key, text in (r.get("recipe") or {}).get("notes", {}).items():
        lines.append(f"{key:<23} {text}")
    if r.get("config"):
        lines.append(f"config          {r['config']} (train.max_steps {r['max_steps']:,}, run folder {r['out_dir']})")
    return "\n".join(lines)


def _plan_params_text(r: dict[str, Any]) -> str:
    p, error = r["params"], f"{r['params_error']:+.1%} from N = {_fmt_count(r['target_params'])}"
    if not r["moe"]:
        return f"parameters      {p['total']:,} ({error}), non-embedding {p['non_embedding']:,}"
    e = r["moe"]
    return (f"parameters      {p['active']:,} active per token ({error}), {p['total']:,} in all (top-{e['top_k']} "
            f"of {e['num_experts']} experts)\n"
            f"MoE             N is the active parameters (C = 6ND counts a token's FLOPs); the laws are dense "
            f"models' fits, which an MoE model of this active N and D beats (Clark et al. 2022)")


def _data_text(r: dict[str, Any]) -> list[str]:
    if not r.get("data"):
        return []
    d = r["data"]
    lines = [f"data            {s['path']}: {s['train_tokens']:,} training tokens ({s['share']:.0%} of samples), "
             f"{s['epochs']:,.1f} epochs of it" for s in d["sources"]]
    if r.get("vocab_source"):
        lines.append(f"vocabulary      {r['shape']['vocab_size']:,} (from {r['vocab_source']})")
    if d["repeats_too_much"]:
        lines.append(f"warning         {d['max_epochs']:,.0f} epochs: past ~{d['fresh_epochs']} epochs repeated tokens "
                     f"are worth less than fresh ones, and extra compute soon buys nothing (Muennighoff et al. 2023, "
                     f"Scaling Data-Constrained Language Models). Get more data, or size the run for the data you "
                     f"have: {d['fresh_epochs']} epochs are {d['fresh_tokens']:.3g} tokens (--tokens), compute-"
                     f"optimal for about {d['fresh_tokens'] / 20:.3g} parameters at ~20 tokens per parameter")
    return lines


def cmd_plan(args: argparse.Namespace) -> None:
    budget = [x is not None for x in (args.compute, args.params, args.tokens, args.hours)]
    if sum(budget) != 1:
        raise ValueError("give exactly one budget: --compute C, --params N, --tokens D, or --gpus G --hours H "
                         "(with --peak-tflops and --mfu)")
    _check_plan_numbers(args)
    if args.write_config and args.config and _same_file(args.write_config, args.config):
        raise ValueError(f"--write-config {args.write_config} is the --config it plans from, which it would "
                         f"overwrite: write the plan to a new file (e.g. --write-config "
                         f"{Path(args.write_config).with_suffix('')}-planned.yaml)")
    # Refused above before torch is imported (by the parameter count below): a refusal answers at once.
    from dist_train.monitor.throughput import PEAKS
    from dist_train.scaling.laws import compute_from_hardware
    from dist_train.scaling.plan import (
        data_sources,
        epochs_report,
        plan,
        planned_config,
        vocab_for_data,
        write_config,
    )

    if args.peak_tflops is None:
        args.peak_tflops = PEAKS["H100"].half
    compute = args.compute
    if args.hours is not None:
        compute = compute_from_hardware(args.gpus, args.hours, args.peak_tflops, args.mfu)
    overrides = overrides_from(args)
    cfg = load_sizing_config(args.config, [*([] if args.config else PLAN_DEFAULTS), *overrides])
    sources = data_sources(cfg) if cfg.data.path != NO_DATA else []
    vocab_set = any(o.split("=", 1)[0].strip() == "model.vocab_size" for o in overrides)
    if sources and not vocab_set:  # the data's tokenizer decides the embedding, not a preset's default
        cfg = load_sizing_config(args.config, [*([] if args.config else PLAN_DEFAULTS), *overrides,
                                               f"model.vocab_size={vocab_for_data(sources)}"])
    r = plan(cfg, compute=compute, params=args.params, tokens=args.tokens, method=args.method,
             gpus=args.gpus, peak_tflops=args.peak_tflops, mfu=args.mfu)
    r["budget_hours"] = args.hours
    if sources:
        r["data"] = epochs_report(sources, r["tokens"])
        r["vocab_source"] = None if vocab_set else ", ".join(f"{s['path']}/manifest.json" for s in sources)
    if args.write_config and cfg.data.path == NO_DATA:
        raise ValueError("--write-config needs a data source for the trainer: pass --config with data.path "
                         "or --set data.path=<shard folder>")
    if args.write_config or args.gpu_memory:
        out_dir = default_out_dir(Path(args.write_config)) if args.write_config else None
        out, notes = planned_config(cfg, r, world_size=args.gpus, out_dir=out_dir), None
    if args.gpu_memory:
        from dist_train.scaling.recipe import parse_memory, recipe

        out, chosen = recipe(out, compute=r["run_flops"], tokens=r["tokens"], gpus=args.gpus,
                             budget_bytes=parse_memory(args.gpu_memory))
        r["recipe"] = dataclasses.asdict(chosen)
        notes = chosen.notes
    if args.write_config:
        r["config"] = str(write_config(out, args.write_config, notes))
        r["max_steps"] = out.train.max_steps
        r["out_dir"] = out.run.out_dir
    _emit(r, args.json, _plan_text(r))


def _check_plan_numbers(args: argparse.Namespace) -> None:
    """Every number of a plan positive and finite (a zero budget divided by zero, a negative one made the laws'
    powers complex, nan went through), the MFU a fraction."""
    for flag, value in (("--compute", args.compute), ("--params", args.params), ("--tokens", args.tokens),
                        ("--hours", args.hours), ("--gpus", args.gpus), ("--peak-tflops", args.peak_tflops)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value:g}")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu is a fraction of peak in (0, 1], got {args.mfu:g}")


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through links and `..` too)."""
    try:
        return Path(a).samefile(b)
    except OSError:  # one of them does not exist yet
        return Path(a).resolve() == Path(b).resolve()


def _gib(n: int) -> str:
    return f"{n / 2**30:10.3f} GiB"


def _memory_text(r: dict[str, Any]) -> str:
    e = r["estimate"]
    offload = ", optimizer offloaded to CPU" if r["offload_optimizer"] else ""
    tp, sp, ep = r["tensor_parallel"], r["sequence_parallel"], r["expert_parallel"]
    layout = f" (tensor parallel {tp}, sequence parallel {sp})" if tp * sp > 1 else ""
    layout += f" (expert parallel {ep}: {r['experts_per_gpu']} experts per MoE layer per GPU)" if r["moe"] else ""
    rows = [f"per GPU: ZeRO-{r['zero_stage']} on {r['gpus']} GPU(s){layout}, {r['precision']}, micro-batch "
            f"{r['micro_batch']} x {r['seq_len']} tokens{offload} ({_fmt_count(r['params'])} parameters)",
            f"  weights                    {_gib(e['weights'])}",
            f"  gradients                  {_gib(e['gradients'])}",
            f"  optimizer states           {_gib(e['optimizer_states'])}  (fp32 master + AdamW m, v)",
            f"  DeepSpeed buffers          {_gib(e['buffers'])}  (reduce buckets; ZeRO-3 gathered layer)",
            f"  transient in backward      {_gib(e['backward_transient'])}",
            f"  transient in step          {_gib(e['step_transient'])}  (fp32 gradient partition)",
            f"  activations                {_gib(e['activations'])}",
            f"  activations, recomputed    {_gib(e['activations_checkpointed'])}  (grad_checkpointing)",
            f"  peak                       {_gib(e['peak'])}",
            f"  peak with recomputation    {_gib(e['peak_checkpointed'])}"]
    if e["cpu_offloaded"]:
        rows.append(f"  CPU memory per rank        {_gib(e['cpu_offloaded'])}")
    if r["moe"]:
        rows.append("  note: activations count each MoE layer as the dense MLP; its top-k experts and DeepSpeed's "
                    "dispatch buffers save more, so they and the peaks are low for MoE")
    return "\n".join(rows)


def cmd_memory(args: argparse.Namespace) -> None:
    from dist_train.model.count import count_params
    from dist_train.scaling.memory import estimate_memory, with_overrides

    cfg = with_overrides(load_sizing_config(args.config, overrides_from(args)), zero_stage=args.zero_stage,
                         offload_optimizer=args.offload_optimizer or None, micro_batch=args.micro_batch,
                         precision=args.precision, tensor=args.tensor, sequence=args.sequence, expert=args.expert)
    est = estimate_memory(cfg, args.gpus)
    moe = cfg.model.moe
    r = {"gpus": args.gpus, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.precision,
         "tensor_parallel": cfg.parallel.tensor, "sequence_parallel": cfg.parallel.sequence,
         "expert_parallel": cfg.parallel.expert, "moe": moe.enabled,
         "experts_per_gpu": moe.num_experts // cfg.parallel.expert if moe.enabled else None,
         "offload_optimizer": cfg.deepspeed.offload_optimizer, "micro_batch": cfg.train.micro_batch_size,
         "seq_len": cfg.model.seq_len, "params": count_params(cfg.model).total, "estimate": est.to_dict()}
    _emit(r, args.json, _memory_text(r))


def _fit_text(r: dict[str, Any]) -> str:
    law = r["law"]
    lines = [f"fitted to {r['runs']} runs (Huber δ=1e-3 on log loss, L-BFGS from {r['starts']} starts; "
             f"R² {r['r2_log_loss']:.4f}, RMSE {r['rmse_log_loss']:.4f} of log loss):",
             f"  L(N, D) = {law['E']:.4f} + {law['A']:.4g} / N^{law['alpha']:.4f} "
             f"+ {law['B']:.4g} / D^{law['beta']:.4f}",
             f"compute-optimal: N_opt = {r['G']:.4g} (C/6)^{r['a']:.4f}, D_opt ∝ C^{r['b']:.4f}",
             f"{'C (FLOPs)':>12} {'N_opt':>10} {'D_opt':>10} {'D/N':>7} {'loss':>7}"]
    for row in r["allocations"]:
        lines.append(f"{row['compute']:>12.3e} {_fmt_count(row['params']):>10} {_fmt_count(row['tokens']):>10} "
                     f"{row['tokens_per_param']:>7.1f} {row['loss']:>7.4f}")
    if r.get("plot"):
        lines.append(f"figure: {r['plot']}")
    return "\n".join(lines)


def cmd_fit(args: argparse.Namespace) -> None:
    from dist_train.scaling.fit import fit_loss_law, fit_report, load_runs, plot_fit

    runs = load_runs(args.runs)
    starts = None if args.starts == "all" else int(args.starts)
    result = fit_loss_law(runs, starts=starts)
    r = fit_report(runs, result, extra_budgets=args.compute or [])
    if args.plot:
        r["plot"] = str(plot_fit(runs, result, args.plot))
    _emit(r, args.json, _fit_text(r))


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML config (a preset from configs/ or your own)")
    add_override_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dist_train.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_count, _add_plan, _add_memory, _add_fit):
        add(sub)
    return parser


def _add_count(sub: Any) -> None:
    p = sub.add_parser("count", help="exact parameter count and training FLOPs of a config (MoE: total and "
                                     "active per token; FLOPs count the active ones)")
    _add_config_args(p)
    p.add_argument("--tokens", type=float, help="training tokens of the run: also print the run's FLOPs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_count)


def _add_plan(sub: Any) -> None:
    p = sub.add_parser("plan", help="compute-optimal N and D under each published law, a shape and a config",
                       description="Budget: exactly one of --compute, --params, --tokens, or --gpus/--hours. "
                                   "Without --config the family is Llama-style with vocab 32000, seq_len 2048, "
                                   "bf16. A config with model.moe is planned by its active parameters (N of the "
                                   "laws and of C = 6ND: what a token uses), its experts kept on top; the laws "
                                   "are fits to dense models, which an MoE model of that active size beats.")
    p.add_argument("--compute", type=float, help="training budget in FLOPs (C = 6ND convention)")
    p.add_argument("--params", type=float, help="model size N: gives each law's compute-optimal D and C")
    p.add_argument("--tokens", type=float, help="token budget D: gives each law's compute-optimal N and C")
    p.add_argument("--hours", type=float, help="wall-clock hours on --gpus GPUs (derives C with --peak-tflops, "
                                               "--mfu)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the run (default 1)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s per GPU (default H100 SXM dense bf16, 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--method", default="besiroglu",
                   choices=["approach1", "approach2", "approach3", "besiroglu"],
                   help="law whose N and D the shape and config follow (default besiroglu)")
    _add_config_args(p)
    p.add_argument("--write-config", metavar="F.yaml", help="write the planned config (base: --config)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GiB: choose the micro-batch, ZeRO "
                                                        "stage and recomputation that fit it, and the batch, lr and "
                                                        "warmup for the budget, each with its source")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)


def _add_memory(sub: Any) -> None:
    p = sub.add_parser("memory", help="bytes per GPU: weights, gradients, optimizer states, activations")
    _add_config_args(p, required=True)
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the run: data x tensor x sequence parallel "
                                                       "(default 1)")
    p.add_argument("--tensor", type=int, help="tensor-parallel size (default: the config's parallel.tensor)")
    p.add_argument("--sequence", type=int, help="sequence-parallel size (default: the config's parallel.sequence)")
    p.add_argument("--expert", type=int, help="expert-parallel size of an MoE model: each GPU holds num_experts / "
                                              "EXPERT experts per MoE layer (default: the config's parallel.expert)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="default: the config's")
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer states on the CPU (ZeRO >= 1)")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per forward (default: the config's)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: the config's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_memory)


def _add_fit(sub: Any) -> None:
    p = sub.add_parser("fit", help="fit L(N, D) = E + A/N^α + B/D^β to your runs (Hoffmann et al.'s method)")
    p.add_argument("runs", nargs="+", help="a CSV with columns N, D, loss; run folders (summary.json + "
                                           "config.yaml); or folders holding run folders")
    p.add_argument("--plot", metavar="F.png", help="write an IsoFLOP-style figure")
    p.add_argument("--compute", type=float, action="append", help="also print the allocation at this budget "
                                                                  "(FLOPs; repeatable)")
    p.add_argument("--starts", default="50", help="L-BFGS starts: the N best points of the paper's 4,500-point "
                                                  "grid (default 50), or 'all'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_fit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    if args.command == "count" and args.tokens is not None:
        args.tokens = int(args.tokens)
    try:
        args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

