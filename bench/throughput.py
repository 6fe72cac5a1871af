"""Throughput of our trainer against HF `Trainer` with the same DeepSpeed config, model, data, batch, machine.

Runs side by side, each under the deepspeed launcher with N processes (GPUs, or CPU processes on gloo):
  ours/own-model           launch/train.py with dist_train.model.Transformer
  ours/own-model+compile   the same with train.compile=true (torch.compile of the model)
  ours/hf-model            launch/train.py with model.hf_config = the same shape as a transformers LlamaForCausalLM
  hf-trainer               transformers.Trainer + DeepSpeed on that LlamaForCausalLM (bench/hf_trainer_baseline.py)
  hf-trainer+compile       the same with TrainingArguments(torch_compile=True)
  hf-trainer+eager-attn    HF tuned by hand for the CPU in bf16: attn_implementation="eager" (its default SDPA
                           runs torch's CPU flash kernel, slow in 16-bit for short sequences; ours picks matmul
                           attention there by itself, see model.attention)
  hf-trainer+eager-attn+compile  the same, compiled
All runs are repeated --repeats times in alternation (the median is reported), so a noisy machine affects all
of them alike. Prints tokens/s, the ratio to the HF Trainer as it comes and to the fastest HF Trainer row, and
MFU (against the GPU's dense peak; on the CPU against a measured one-core matmul in the run's precision, per
process).

    python bench/throughput.py [--config configs/tiny.yaml] [--nproc 2] [--steps 30] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dist_train.config import Config, ModelConfig, load_config  # noqa: E402
from dist_train.model.count import flops_per_token  # noqa: E402
from dist_train.monitor.throughput import math_mode, peak_flops  # noqa: E402
from dist_train.distributed.process_group import configure_matmul_precision  # noqa: E402
from bench.demo_data import DEMO_SHARDS, ensure_demo_data  # noqa: E402
from launch.devices import deepspeed_device_args  # noqa: E402

TIMING_WARMUP_STEPS = 5


def write_llama_config(m: ModelConfig, folder: Path) -> Path:
    """Our rope/rmsnorm/swiglu shape as a transformers LlamaConfig."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
                num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, vocab_size=m.vocab_size,
                max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                rope_theta=m.rope_theta, attention_bias=m.bias, mlp_bias=m.bias).save_pretrained(folder)
    return folder


def launcher_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def deepspeed_cmd(nproc: int, port: int, script: Path, *args: str) -> list[str]:
    devices = deepspeed_device_args(nproc, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available())
    return [sys.executable, "-m", "deepspeed.launcher.runner", *devices, f"--master_port={port}", str(script), *args]


def run(cmd: list[str], label: str) -> None:
    print(f"[{label}] {' '.join(cmd[-6:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[{label}] failed with exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def ours(config: str, overrides: list[str], nproc: int, steps: int, out: Path, port: int) -> float:
    log_every = TIMING_WARMUP_STEPS
    run(deepspeed_cmd(nproc, port, REPO / "launch" / "train.py", "--config", config, "--resume", "none",
                      *overrides, f"run.out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0",
                      "checkpoint.every=0", f"train.log_every={log_every}"), out.name)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > TIMING_WARMUP_STEPS]
    # Mean time per step over the timed windows, as tokens/s.
    return len(rates) / sum(1 / r for r in rates)


def hf_trainer(config: str, overrides: list[str], hf_dir: Path, nproc: int, steps: int, out: Path,
               port: int, compile_model: bool = False, attn: str | None = None) -> float:
    result = out / "result.json"
    out.mkdir(parents=True, exist_ok=True)
    run(deepspeed_cmd(nproc, port, REPO / "bench" / "hf_trainer_baseline.py", "--config", config,
                      "--hf-config", str(hf_dir), "--steps", str(steps), "--warmup-steps", str(TIMING_WARMUP_STEPS),
                      "--out", str(result), *(["--compile"] if compile_model else []),
                      *(["--attn", attn] if attn else []), *overrides), out.name)
    return json.loads(result.read_text())["tokens_per_s"]


def cpu_matmul_peak_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of one core on a matmul in `dtype`: the CPU's practical peak, as each process runs one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = (time.perf_counter() - start) / repeats
    torch.set_num_threads(threads)
    return 2 * n**3 / seconds


def machine_peak(cfg: Config, nproc: int) -> tuple[float, str]:
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        configure_matmul_precision(device, cfg.train.tf32)  # as the trainer does: fp32 runs in TF32 by default
        peak = peak_flops(device, math_mode(cfg.precision))
        return (peak or float("nan")) * nproc, f"{nproc} x {torch.cuda.get_device_name(0)} dense {cfg.precision} peak"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    return cpu_matmul_peak_flops(dtype) * nproc, f"{nproc} CPU cores x measured 1-thread {cfg.precision} matmul"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--nproc", type=int, default=max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--data", default=str(DEMO_SHARDS))
    p.add_argument("--repeats", type=int, default=3, help="rounds of all runs; the median is reported")
    p.add_argument("--skip-hf-model", action="store_true", help="skip ours/hf-model (saves a run)")
    p.add_argument("--runs", help="comma-separated names of the runs to make (default: all), e.g. "
                                  "ours/own-model,hf-trainer")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("overrides", nargs="*", help="config overrides for all runs, e.g. deepspeed.zero_stage=2")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()

    ensure_demo_data(Path(args.data))
    overrides = [f"data.path={args.data}", *args.overrides]
    cfg = load_config(args.config, overrides)
    work = Path(tempfile.mkdtemp(prefix="dist_train_bench_"))
    hf_dir = write_llama_config(cfg.model, work / "hf_llama")
    runs = {
        "ours/own-model": lambda out: ours(args.config, overrides, args.nproc, args.steps, out, 29611),
        "ours/own-model+compile": lambda out: ours(args.config, [*overrides, "train.compile=true"], args.nproc,
                                                   args.steps, out, 29614),
        "ours/hf-model": lambda out: ours(args.config, [*overrides, f"model.hf_config={hf_dir}"], args.nproc,
                                          args.steps, out, 29612),
        "hf-trainer": lambda out: hf_trainer(args.config, overrides, hf_dir, args.nproc, args.steps, out, 29613),
        "hf-trainer+compile": lambda out: hf_trainer(args.config, overrides, hf_dir, args.nproc, args.steps, out,
                                                     29615, compile_model=True),
        "hf-trainer+eager-attn": lambda out: hf_trainer(args.config, overrides, hf_dir, args.nproc, args.steps,
                                                        out, 29617, attn="eager"),
        "hf-trainer+eager-attn+compile": lambda out: hf_trainer(args.config, overrides, hf_dir, args.nproc,
                                                                args.steps, out, 29616, compile_model=True,
                                                                attn="eager"),
    }
    if args.skip_hf_model:
        del runs["ours/hf-model"]
    if args.runs:
        unknown = set(args.runs.split(",")) - runs.keys()
        if unknown or "hf-trainer" not in args.runs.split(","):
            p.error(f"--runs: unknown {sorted(unknown)} or no hf-trainer (the reference); names: {', '.join(runs)}")
        runs = {name: fn for name, fn in runs.items() if name in args.runs.split(",")}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, fn in runs.items():
            samples[name].append(fn(work / f"{name.replace('/', '_').replace('+', '_')}_{round_}"))
    results = {name: statistics.median(values) for name, values in samples.items()}

    peak, peak_what = machine_peak(cfg, args.nproc)
    fpt = flops_per_token(cfg.model)
    best_hf = max(tps for name, tps in results.items() if name.startswith("hf-trainer"))
    rows = [{"run": name, "tokens_per_s": tps, "ratio_vs_hf_trainer": tps / results["hf-trainer"],
             "ratio_vs_best_hf_trainer": tps / best_hf, "mfu": fpt * tps / peak, "samples": samples[name]}
            for name, tps in results.items()]
    report = {"config": args.config, "overrides": args.overrides, "nproc": args.nproc, "steps": args.steps,
              "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.precision,
              "global_batch_tokens": cfg.train.micro_batch_size * cfg.train.grad_accum_steps * args.nproc
              * cfg.model.seq_len, "peak_flops": peak, "peak": peak_what, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"\n{args.nproc} processes, ZeRO {cfg.deepspeed.zero_stage}, {cfg.precision}, "
          f"{report['global_batch_tokens']:,} tokens/step, MFU against {peak_what} = {peak / 1e12:.3f} TFLOP/s")
    print(f"{'run':<31}{'tokens/s':>10}{'vs HF Trainer':>15}{'vs best HF':>12}{'MFU':>8}   samples")
    for r in rows:
        print(f"{r['run']:<31}{r['tokens_per_s']:>10,.0f}{r['ratio_vs_hf_trainer']:>14.2f}x"
              f"{r['ratio_vs_best_hf_trainer']:>11.2f}x{100 * r['mfu']:>7.1f}%"
              f"   {', '.join(f'{v:,.0f}' for v in r['samples'])}")
    print(f"(median over {args.repeats} alternating rounds of the mean time per step after {TIMING_WARMUP_STEPS} "
          f"warm-up steps; work folder {work})")


if __name__ == "__main__":
    main()
