"""Post-norm encoder-decoder with and without lr warmup (issue 18: "post-LN without warmup diverges or trails").

Each run is the real trainer (2 CPU processes, DeepSpeed ZeRO 1, fp32) on `configs/t5-tiny.yaml`'s span
corruption, with the original Transformer's post-norm layout and init:

  BART layout (model.norm_position=post, layernorm, learned positions, gelu, biases), 6 + 6 layers, d_model 256,
  d_ff 1024; model.init=xavier (Xavier-uniform weights, no depth scaling);
  Adam beta2 0.98 as in Vaswani et al., no gradient clipping, no weight decay; peak lr 5e-4 reached after
  train.warmup_steps of 0 or 60, then cosine decay to 5e-5; 300 steps of 16 sequences.

Pairs (warmup 0 / 60) for each --seeds, plus a control without warmup under the default init (model.init=normal,
which shrinks each residual branch by 1/sqrt(2 n_layers)). Prints the val losses side by side and the unigram
level, and writes docs/encdec_postln_xavier_warmup.png. A run whose folder under --out already holds a
summary.json is reused, so an interrupted sweep continues.

    python bench/postln_warmup.py [--data SHARD_DIR] [--out DIR] [--seeds 1234 1] [--no-control]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dist_train.monitor.jsonl import read_metrics  # noqa: E402
from bench.demo_data import DEMO_SHARDS  # noqa: E402
from bench.loss_figure import loss_figure  # noqa: E402

WARMUPS = (0, 60)
POST_NORM = ["model.norm_position=post", "model.norm=layernorm", "model.pos=learned", "model.mlp=gelu",
             "model.bias=true", "model.norm_eps=1e-5", "model.n_layers=6", "model.d_model=256", "model.d_ff=1024",
             "train.max_steps=300", "train.micro_batch_size=8", "train.lr=5e-4", "train.min_lr=5e-5",
             "train.grad_clip=0", "train.beta2=0.98", "train.weight_decay=0", "train.eval_every=100",
             "checkpoint.every=0"]


def train(data: Path, run_dir: Path, init: str, warmup: int, seed: int, port: int) -> None:
    if (run_dir / "summary.json").exists():
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(REPO / "launch" / "train.py"),
           "--config", str(REPO / "configs" / "t5-tiny.yaml"),
           f"data.path={data}", f"run.out_dir={run_dir}", f"model.init={init}", f"train.warmup_steps={warmup}",
           f"train.seed={seed}", *POST_NORM]
    print(f"training {run_dir.name} ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


def unigram_loss(data: Path) -> float:
    """Cross-entropy of the val targets under the train targets' unigram distribution (dist_train.evaluate's)."""
    from dist_train.config import load_config
    from dist_train.tools.evaluate import unigram_loss as loss_of, unigram_probs, val_windows

    cfg = load_config(REPO / "configs" / "t5-tiny.yaml", [f"data.path={data}"])
    return loss_of(unigram_probs(cfg, 100_000_000), val_windows(cfg, None))


def plot(runs: dict[str, Path], table: dict[str, dict[int, float]], out: Path) -> None:
    colours = {"w0": "tab:red", "w60": "tab:blue", "control": "tab:gray"}
    title = "Post-norm encoder-decoder, Xavier init, peak lr 5e-4: warmup 0 (red) vs 60 steps (blue)"
    with loss_figure(out, title, height=4.8, legend_size=7) as ax:
        ax.set_ylim(4.4, 7.0)
        for name, run_dir in runs.items():
            records = read_metrics(run_dir)
            kind = "control" if name.startswith("normal") else name.rsplit("_", 1)[1]
            style = "-" if "s1234" in name else ":"
            steps = [r["step"] for r in records if "loss" in r]
            ax.plot(steps, [r["loss"] for r in records if "loss" in r], style, color=colours[kind], lw=1.3,
                    label=f"{name}: val {table[name][max(table[name])]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEMO_SHARDS,
                        help="a shard folder of a 2,048-token tokenizer (as `make demo` writes it)")
    parser.add_argument("--out", type=Path, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1])
    parser.add_argument("--no-control", action="store_true", help="skip the default-init run")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "encdec_postln_xavier_warmup.png")
    parser.add_argument("--json", action="store_true", help="print the val losses as JSON")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="postln_warmup_"))
    runs: dict[str, Path] = {}
    port = 29780
    for seed in args.seeds:
        for warmup in WARMUPS:
            name = f"xavier_post_s{seed}_w{warmup}"
            port += 1
            train(args.data, out / name, "xavier", warmup, seed, port)
            runs[name] = out / name
    if not args.no_control:
        name = f"normal_post_s{args.seeds[0]}_w0"
        train(args.data, out / name, "normal", 0, args.seeds[0], port + 1)
        runs[name] = out / name
    unigram = unigram_loss(args.data)
    table = {name: val_losses(run_dir) for name, run_dir in runs.items()}
    if args.json:
        print(json.dumps({"unigram": unigram, "val_loss": table}))
    else:
        print(f"val loss at steps 100 / 200 / 300 (unigram model of the targets: {unigram:.3f})")
        for name, losses in table.items():
            print(f"  {name:24s} " + " / ".join(f"{losses[s]:.3f}" for s in (100, 200, 300)))
    plot(runs, table, args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
