"""How long training stops for a checkpoint save: a ~100 M-parameter model, 2 processes, ZeRO 1 and 3, blocking
saves and background ones (checkpoint.async_save).

Each variant trains 4 steps with a checkpoint every 2 under torchrun: the save after step 2 is a periodic one
(in the background with async_save, overlapping steps 3-4), the one after step 4 is the final one, which always
waits for its files. It reads the trainer's own timing lines from metrics.jsonl (`checkpoint_s`: the whole stop;
for blocking saves also `checkpoint_write_s`: this rank's writes - serialise, fsync, sha256 for files.json - and
`checkpoint_publish_s`: waiting for the other rank + rank 0's publish) and the step times. Prints one row per
save, the checkpoint's size, and the mean time of steps 3-4 (slowed by a background write) against step 2.

    python bench/checkpoint_stall.py [--data SHARD_DIR] [--stages 1 3] [--variants sync async] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.demo_data import DEMO_SHARDS  # noqa: E402
from dist_train.config import load_config  # noqa: E402
from dist_train.model.count import count_params  # noqa: E402
from dist_train.monitor.jsonl import read_metrics  # noqa: E402

MODEL_100M = ["model.n_layers=14", "model.d_model=768", "model.n_heads=12", "model.n_kv_heads=12",
              "model.d_ff=2048", "model.seq_len=128"]
"""Llama-style, tied 2,048-token embedding: 101 M parameters."""
TOKENS_PER_STEP = 2 * 128  # 2 processes x micro-batch 1 x seq_len 128


def run_metrics(data: Path, out: Path, stage: int, extra: list[str]) -> list[dict]:
    overrides = [f"data.path={data}", f"run.out_dir={out}", *MODEL_100M, "precision=fp32",
                 "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.max_steps=4", "train.log_every=1",
                 "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=1",
                 f"deepspeed.zero_stage={stage}", *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           "--master_port=29731", str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return read_metrics(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEMO_SHARDS)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--variants", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={args.data}", *MODEL_100M])
    print(f"model: {count_params(cfg.model).total:,} parameters; {platform.machine()}, {os.cpu_count()} cores")
    print(f"{'stage':>5} {'variant':>7} {'step':>4} {'stall s':>8} {'writes s':>9} {'publish s':>10} "
          f"{'ckpt GB':>8} {'step 2 s':>9} {'steps 3-4 s':>12}")
    for stage in args.stages:
        for variant in args.variants:
            with tempfile.TemporaryDirectory(prefix="ckpt_stall_") as tmp:
                records = run_metrics(args.data, Path(tmp), stage,
                                      [f"checkpoint.async_save={variant == 'async'}", *args.overrides])
                size = sum(p.stat().st_size for p in (Path(tmp) / "checkpoints" / "step_00000004").rglob("*"))
            step_s = {r["step"]: TOKENS_PER_STEP / r["tokens_per_s"] for r in records if "loss" in r}
            for r in (r for r in records if "checkpoint_s" in r):
                print(f"{stage:>5} {variant:>7} {r['step']:>4} {r['checkpoint_s']:>8.2f} "
                      f"{r.get('checkpoint_write_s', float('nan')):>9.2f} "
                      f"{r.get('checkpoint_publish_s', float('nan')):>10.2f} {size / 1e9:>8.2f} "
                      f"{step_s[2]:>9.2f} {(step_s[3] + step_s[4]) / 2:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
