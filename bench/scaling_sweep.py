"""A tiny IsoFLOP sweep on the bundled Shakespeare corpus, then `dist_train.scaling fit` on its runs.

    python bench/scaling_sweep.py [--out runs/scaling_sweep] [--budgets 1e12 2.5e12 6e12] [--sizes 3]

For each compute budget C (FLOPs, C = 6ND with N the total parameter count, Chinchilla's convention) it
trains `--sizes` Llama-style models (configs/tiny.yaml's family) whose sizes bracket the ~20 tokens per
parameter optimum, each on D = C / (6N) tokens with its own cosine schedule, one CPU process per run
(`python launch/train.py`, the trainer users run). Then it fits L(N, D) to the runs' validation losses and
draws the IsoFLOP figure. Finished runs are skipped, so an interrupted sweep resumes.

Without --data it prepares the corpus with a 512-token BPE (2.6 M tokens): with GPT-2-sized vocabularies a
model small enough for a CPU budget would be mostly embedding table.
Outputs in --out: runs/<name>/ (run folders), results.json, isoflop.png, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dist_train.config import ModelConfig, load_config  # noqa: E402
from dist_train.model.count import count_params, flops_per_token  # noqa: E402
from dist_train.scaling.fit import fit_loss_law, fit_report, load_runs, plot_fit  # noqa: E402
from dist_train.scaling.plan import d_ff_for  # noqa: E402
from bench.ports import free_port  # noqa: E402

BASE_CONFIG = REPO / "configs" / "tiny.yaml"
TOKENS_PER_PARAM = 20  # where the sizes are centred (Chinchilla's rule of thumb)
HEAD_DIM = 32  # below the published 64: these models are 64-256 wide


def prepare_data(out: Path, vocab_size: int) -> Path:
    """Corpus -> BPE tokenizer -> shards, with the data_prep commands of `make demo`."""
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    corpus = out / "shakespeare.jsonl"
    steps = [["-m", "data_prep.corpora", "shakespeare", "--out", str(out)],
             ["-m", "data_prep.tokenizer", "--input", str(corpus), "--vocab-size", str(vocab_size),
              "--out", str(out / "tokenizer"), "--no-progress"],
             ["-m", "data_prep.shard", "--input", str(corpus), "--tokenizer", str(out / "tokenizer"),
              "--out", str(shards), "--val-fraction", "0.05", "--num-proc", "1"]]
    for step in steps:
        subprocess.run([sys.executable, *step], cwd=REPO, check=True)
    return shards


def tiny_shapes(base: ModelConfig) -> list[ModelConfig]:
    """Candidate shapes: widths 32-256 in whole 32-wide heads, 1-8 layers with d_model / n_layers in
    [16, 128], the base's kv grouping where it divides."""
    shapes = []
    group = base.n_heads // base.kv_heads
    for d_model in (32, 64, 96, 128, 160, 192, 256):
        n_heads = d_model // HEAD_DIM
        n_kv = n_heads // group if base.n_kv_heads and n_heads % group == 0 else None
        for n_layers in range(1, 9):
            if not 16 <= d_model / n_layers <= 128:  # neither a deep thread nor a single wide layer
                continue
            shapes.append(dataclasses.replace(base, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                              n_kv_heads=n_kv, d_ff=d_ff_for(d_model, base.mlp)))
    return shapes


def sizes_for_budget(budget: float, shapes: list[ModelConfig], k: int, spread: float = 2.0) -> list[ModelConfig]:
    """k distinct shapes closest (in log N) to N* x spread^j, j centred on 0, N* = sqrt(C / (6 x 20))."""
    centre = math.sqrt(budget / (6 * TOKENS_PER_PARAM))
    targets = [centre * spread ** (j - (k - 1) / 2) for j in range(k)]
    chosen: list[ModelConfig] = []
    for target in targets:
        pool = [s for s in shapes if s not in chosen]
        chosen.append(min(pool, key=lambda s: abs(math.log(count_params(s).total / target))))
    return sorted(chosen, key=lambda s: count_params(s).total)


def train_run(run_dir: Path, shape: ModelConfig, tokens: int, data: Path, base: Path) -> dict:
    """One run with the trainer users run (plain `python launch/train.py`, one CPU process)."""
    cfg = load_config(base, [f"data.path={data}"])
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * shape.seq_len
    steps = max(20, math.ceil(tokens / tokens_per_step))
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("final_step") == steps:
        return json.loads(summary.read_text())
    shape_keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size")
    overrides = [f"model.{k}={'null' if getattr(shape, k) is None else getattr(shape, k)}" for k in shape_keys]
    overrides += [f"data.path={data}", f"run.out_dir={run_dir}", f"train.max_steps={steps}",
                  f"train.warmup_steps={min(20, steps // 10)}", f"train.eval_every={steps}", "train.eval_steps=40",
                  f"train.log_every={max(1, steps // 10)}", "checkpoint.every=0", "wandb.enabled=false"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/dist_train/torch_extensions"))
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(base), *overrides], cwd=REPO,
                              env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed (exit {proc.returncode}); see {log}")
    return json.loads(summary.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/scaling_sweep", help="output folder (default runs/scaling_sweep)")
    parser.add_argument("--data", help="a shard folder to train on (default: prepare Shakespeare, --vocab)")
    parser.add_argument("--vocab", type=int, default=512, help="BPE vocabulary when preparing the data")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1e12, 2.5e12, 6e12], help="FLOPs (6ND)")
    parser.add_argument("--sizes", type=int, default=3, help="models per budget (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of Markdown")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    data = Path(args.data).resolve() if args.data else prepare_data(out / "data", args.vocab)
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    base = dataclasses.replace(load_config(BASE_CONFIG, [f"data.path={data}"]).model, vocab_size=vocab)
    shapes = tiny_shapes(base)

    results = []
    for budget in args.budgets:
        for shape in sizes_for_budget(budget, shapes, args.sizes):
            n = count_params(shape).total
            tokens = round(budget / (6 * n))
            name = f"C{budget:.2g}_N{n}".replace("+", "")
            summary = train_run(out / "runs" / name, shape, tokens, data, BASE_CONFIG)
            results.append({"name": name, "budget": budget, "params": n, "n_layers": shape.n_layers,
                            "d_model": shape.d_model, "tokens": summary["tokens"],
                            "flops_6nd": 6 * n * summary["tokens"],
                            "flops": flops_per_token(shape) * summary["tokens"], "val_loss": summary["val_loss"],
                            "train_loss": summary["train_loss"], "wall_s": round(summary["wall_s"], 1),
                            "tokens_per_s": summary["tokens_per_s"]})
            print(f"{name}: N {n:,}, D {summary['tokens']:,}, val_loss {summary['val_loss']:.4f}", file=sys.stderr)

    runs = load_runs([out / "runs"])
    fit = fit_loss_law(runs)
    report = fit_report(runs, fit)
    report["plot"] = str(plot_fit(runs, fit, out / "isoflop.png"))
    (out / "results.json").write_text(json.dumps({"runs": results, "fit": report}, indent=2))
    if args.json:
        print(json.dumps({"runs": results, "fit": report}, indent=2))
        return 0
    print("| budget (6ND FLOPs) | N (params) | n_layers x d_model | D (tokens) | D/N | val loss | train wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['budget']:.2g} | {r['params']:,} | {r['n_layers']} x {r['d_model']} | {r['tokens']:,} | "
              f"{r['tokens'] / r['params']:.1f} | {r['val_loss']:.4f} | {r['wall_s']:.0f} |")
    law = report["law"]
    print(f"\nFit: L(N, D) = {law['E']:.3f} + {law['A']:.4g}/N^{law['alpha']:.3f} + {law['B']:.4g}/D^{law['beta']:.3f}"
          f" (RMSE of log loss {report['rmse_log_loss']:.4f}); compute-optimal a = {report['a']:.3f}, "
          f"b = {report['b']:.3f}. Figure: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
