"""Tokens/s of data, tensor and sequence parallelism on the same model, batch and machine (for information:
on 2 CPU cores the point is that the three layouts run, not their speed).

    python bench/parallel.py [--config configs/tiny.yaml] [--nproc 2] [--steps 20] [key=value ...]

Rows: DP=N (`parallel.*=1`), TP=N (`parallel.tensor=N`, DeepSpeed AutoTP) and SP=N (`parallel.sequence=N`,
DeepSpeed-Ulysses), each under `deepspeed --num_gpus N` with the same global batch of
`train.global_batch_size` sequences (default: micro-batch x N, so TP and SP accumulate N micro-batches where
DP runs one per rank). tokens/s is the mean time per step after the first 5 steps.

The GPU check (one node, 8 GPUs, bf16; a Llama-1B-shaped model at 8192 tokens), the exact commands:

    python -m data_prep.corpora shakespeare --out data/raw
    python -m data_prep.tokenizer --input data/raw/shakespeare.jsonl --vocab-size 8192 --out data/tok
    python -m data_prep.shard --input data/raw/shakespeare.jsonl --tokenizer data/tok --out data/shards
    COMMON="--config configs/llama-1b.yaml data.path=data/shards precision=bf16 model.seq_len=8192 \\
            train.micro_batch_size=1 train.global_batch_size=8 train.max_steps=30 train.eval_every=0 \\
            checkpoint.every=0 deepspeed.zero_stage=2"
    deepspeed --num_gpus 8 launch/train.py $COMMON run.out_dir=runs/gpu_dp8                        # DP=8
    deepspeed --num_gpus 8 launch/train.py $COMMON run.out_dir=runs/gpu_tp8 parallel.tensor=8      # TP=8
    deepspeed --num_gpus 8 launch/train.py $COMMON run.out_dir=runs/gpu_sp8 parallel.sequence=8    # SP=8
    deepspeed --num_gpus 8 launch/train.py $COMMON run.out_dir=runs/gpu_tp2dp4 parallel.tensor=2 \\
        train.global_batch_size=8                                                                   # TP=2 x DP=4
    python -m dist_train.scaling memory --config configs/llama-1b.yaml --gpus 8 --zero-stage 2 \\
        --micro-batch 1 --set model.seq_len=8192 --sequence 8                                      # vs mem_gb

Compare each run's `metrics.jsonl` (`tokens_per_s`, `mfu`, `mem_gb`) and the per-step losses of the four runs
(equal within bf16 noise at the same global batch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench.demo_data import DEMO_SHARDS, ensure_demo_data  # noqa: E402
from bench.ports import free_port  # noqa: E402
from throughput import ours  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) per run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. precision=bf16")
    args = parser.parse_args()
    shards = DEMO_SHARDS
    ensure_demo_data(shards)
    n = args.nproc
    common = [f"data.path={shards}", "train.micro_batch_size=8", f"train.global_batch_size={8 * n}",
              *args.overrides]
    layouts = {f"DP={n}": [], f"TP={n}": [f"parallel.tensor={n}"], f"SP={n}": [f"parallel.sequence={n}"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in layouts.items():
            results[name] = ours(args.config, [*common, *extra], n, args.steps, Path(tmp) / name.replace("=", ""),
                                 free_port())
    print(f"\n{'layout':<10}{'tokens/s':>10}   ({n} processes, global batch {8 * n} x seq_len, "
          f"{args.steps} steps, after 5)")
    for name, tps in results.items():
        print(f"{name:<10}{tps:>10,.0f}")


if __name__ == "__main__":
    main()
