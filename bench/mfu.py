"""Tokens/s and MFU of our trainer on one config, as the trainer itself measures them (metrics.jsonl).

For a lent GPU: the issue's 1B-class run at seq 2048 with bf16 and flash attention (SDPA picks the flash kernel
on CUDA for bf16):

    python bench/mfu.py --config configs/llama-1b.yaml --nproc 1 --steps 40 train.micro_batch_size=4 \
        train.global_batch_size=4 [train.compile=true]

On the CPU it runs too (MFU is then null: the CPU has no published peak). The data is the bundled corpus,
tokenized as `make demo` does (its 2,048-token vocabulary fits any preset's embedding table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.demo_data import DEMO_SHARDS, ensure_demo_data  # noqa: E402
from throughput import TIMING_WARMUP_STEPS, deepspeed_cmd, launcher_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data", default=str(DEMO_SHARDS))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.micro_batch_size=4")
    return p


def main() -> None:
    args = build_parser().parse_args()

    ensure_demo_data(Path(args.data))
    out = Path(tempfile.mkdtemp(prefix="dist_train_mfu_"))
    cmd = deepspeed_cmd(args.nproc, 29631, REPO / "launch" / "train.py", "--config", args.config, "--resume", "none",
                        f"data.path={args.data}", f"run.out_dir={out}", f"train.max_steps={args.steps}",
                        "train.eval_every=0", "checkpoint.every=0", "train.log_every=5", "wandb.enabled=false",
                        *args.overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed with exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > TIMING_WARMUP_STEPS]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    result = {"config": args.config, "overrides": args.overrides, "nproc": args.nproc, "steps": args.steps,
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
              "mfu": statistics.median(mfus) if mfus else None,
              "peak_mem_gib": max(r["mem_gib"] for r in timed), "run_dir": str(out)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no published peak for this device)"
    print(f"{args.config} {' '.join(args.overrides)} on {args.nproc} process(es): "
          f"{result['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak memory {result['peak_mem_gib']:.1f} GiB "
          f"(median of log windows after {TIMING_WARMUP_STEPS} warm-up steps; run folder {out})")


if __name__ == "__main__":
    main()
