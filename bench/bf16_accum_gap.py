"""How far bf16 training drifts from fp32 with many accumulation steps, with gradients summed and all-reduced in
bf16 (DeepSpeed's default, what the generated ds_config did at first) and in fp32 (`deepspeed.grad_accum_dtype:
fp32`, now the default, which sets DeepSpeed's data_types.grad_accum_dtype and communication_data_type).

Three runs of the same config, same data, same seed, under the deepspeed launcher (2 CPU processes or GPUs):
  fp32         precision=fp32                                      the reference
  bf16/bf16    precision=bf16 deepspeed.grad_accum_dtype=bf16      before
  bf16/fp32    precision=bf16 deepspeed.grad_accum_dtype=fp32      after
and prints each bf16 run's gap to the fp32 losses, step by step: mean and max |loss - fp32 loss|.

    python bench/bf16_accum_gap.py [--nproc 2] [--steps 40] [--accum 8] [--json] [key=value ...]
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
from throughput import deepspeed_cmd, launcher_env  # noqa: E402

RUNS = {"fp32": ["precision=fp32"],
        "bf16/bf16": ["precision=bf16", "deepspeed.grad_accum_dtype=bf16"],
        "bf16/fp32": ["precision=bf16", "deepspeed.grad_accum_dtype=fp32"]}


def losses(overrides: list[str], args: argparse.Namespace, port: int) -> list[float]:
    out = Path(tempfile.mkdtemp(prefix="dist_train_gap_"))
    cmd = deepspeed_cmd(args.nproc, port, REPO / "launch" / "train.py", "--config", args.config, "--resume", "none",
                        f"data.path={args.data}", f"run.out_dir={out}", f"train.max_steps={args.steps}",
                        f"train.grad_accum_steps={args.accum}", "train.micro_batch_size=4", "train.log_every=1",
                        "train.eval_every=0", "checkpoint.every=0", "wandb.enabled=false",
                        f"train.warmup_steps={args.steps // 4}", *overrides, *args.overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{overrides} failed with exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--data", default=str(DEMO_SHARDS))
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. deepspeed.zero_stage=2")
    args = p.parse_args()
    ensure_demo_data(Path(args.data))
    curves = {name: losses(overrides, args, 29641 + i) for i, (name, overrides) in enumerate(RUNS.items())}
    reference = curves["fp32"]
    result: dict[str, object] = {"steps": args.steps, "accum": args.accum, "nproc": args.nproc,
                                 "overrides": args.overrides, "final_loss": {k: v[-1] for k, v in curves.items()}}
    for name in ("bf16/bf16", "bf16/fp32"):
        gaps = [abs(a - b) for a, b in zip(curves[name], reference, strict=True)]
        result[f"gap {name}"] = {"mean": statistics.fmean(gaps), "max": max(gaps)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.steps} steps, {args.accum} accumulation steps, {args.nproc} processes {' '.join(args.overrides)}")
    print("final loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result["final_loss"].items()))
    for name in ("bf16/bf16", "bf16/fp32"):
        gap = result[f"gap {name}"]
        print(f"|loss - fp32 loss|, grads summed in {name.split('/')[1]}: mean {gap['mean']:.5f}, "
              f"max {gap['max']:.5f}")


if __name__ == "__main__":
    main()
