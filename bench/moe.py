"""Mixture-of-Experts against the dense model with the same active parameters, and the MoE layer's memory as the
tokens per micro-batch grow.

    python bench/moe.py [--config configs/moe-tiny.yaml] [--nproc 2] [--steps 20] [--repeats 2]
                        [--tokens 2048,8192,32768] [key=value ...]

1. Training, side by side under `deepspeed --num_gpus N` (N CPU processes on gloo, or GPUs), the same data,
   global batch and steps, repeated --repeats times in alternation (median reported):
     dense         model.moe.num_experts=0, model.d_ff = top_k x the expert's d_ff: the MoE's active MLP
     moe EP=1      top-2 of 8 experts in every block, all experts on every process (parallel.expert=1)
     moe EP=N      the same, the experts split over the N processes (parallel.expert=N)
   tokens/s is the mean time per step after the first 5 steps; peak memory is the largest `mem_gib` any rank
   logged (GPU: max allocated; CPU: peak resident set). Goal: MoE step time <= 1.5 x dense.
2. One MoE MLP (the config's shape, 8 experts, top-2, dropless, one process), forward + backward on a micro-batch
   of T tokens: peak memory above what was held before the forward (GPU: max allocated; CPU: the most tensor
   bytes alive at once, counted op by op), a fresh process per size. Goal: at most linear growth, <= 4.5 x for
   4 x the tokens.
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
sys.path.insert(0, str(REPO / "bench"))  # bench/throughput.py; the repo first, its data_prep package included
sys.path.insert(0, str(REPO))

from bench.demo_data import DEMO_SHARDS, ensure_demo_data  # noqa: E402
from bench.ports import free_port  # noqa: E402

TIMING_WARMUP_STEPS = 5
EXPERTS, TOP_K = 8, 2


def train(config: str, overrides: list[str], nproc: int, steps: int, out: Path) -> tuple[float, float]:
    """(tokens/s after the warm-up steps, the largest mem_gib any log line holds) of one launch/train.py run."""
    from throughput import deepspeed_cmd, run

    run(deepspeed_cmd(nproc, free_port(), REPO / "launch" / "train.py", "--config", config, "--resume", "none",
                      *overrides, f"run.out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0",
                      "checkpoint.every=0", f"train.log_every={TIMING_WARMUP_STEPS}"), out.name)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > TIMING_WARMUP_STEPS]
    memory = max(r["mem_gib"] for r in records if "mem_gib" in r)
    return len(rates) / sum(1 / r for r in rates), memory


LAYER_PEAK = """
import json, sys
sys.path.insert(0, REPO)
import torch
from dist_train import distributed
from dist_train.config import load_config
from dist_train.model.moe import MoEMLP
from dist_train.monitor.tensor_bytes import NewTensorBytes

cfg = load_config(CONFIG, OVERRIDES)
distributed.init(distributed.discover())
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
layer = MoEMLP(cfg.model, 0, []).to(device)
x = torch.randn(1, TOKENS, cfg.model.d_model, device=device, requires_grad=True)
layer(x).square().mean().backward()  # warm-up: DeepSpeed's lazy state, the allocator
layer.records.clear()
x.grad = None
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    layer(x).square().mean().backward()
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before
else:
    with NewTensorBytes() as counted:
        layer(x).square().mean().backward()
    peak = counted.peak
print(json.dumps({"bytes": peak}))
"""
"""One MoE MLP's forward + backward; on the CPU every tensor torch creates is counted while alive (the resident set
would count what the allocator keeps)."""


def layer_memory_bytes(config: str, tokens: int, overrides: list[str]) -> int:
    """Peak bytes of one MoE MLP's forward + backward on `tokens` tokens, in a fresh process (see module doc)."""
    from throughput import launcher_env

    layer_overrides = [*overrides, "data.path=unused", f"model.moe.num_experts={EXPERTS}", f"model.moe.top_k={TOP_K}",
                       "model.moe.capacity_factor=0", "parallel.expert=1"]
    code = (f"REPO, CONFIG, OVERRIDES, TOKENS = {str(REPO)!r}, {config!r}, {layer_overrides!r}, {tokens}\n"
            + LAYER_PEAK)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**launcher_env(), **env},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"MoE layer at {tokens} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["bytes"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "moe-tiny.yaml"))
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs) per training run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the training rows, in alternation")
    parser.add_argument("--tokens", default="2048,8192,32768", help="tokens per micro-batch of the layer rows")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. precision=bf16")
    return parser


def training_rows(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """dense, moe EP=1 and (on several processes) moe EP=N: parameters, tokens/s, step time / dense, memory."""
    from dist_train.config import load_config
    from dist_train.model.count import count_params

    shards = DEMO_SHARDS
    ensure_demo_data(shards)
    n = args.nproc
    base = load_config(args.config, ["data.path=unused", *args.overrides])
    moe = [f"model.moe.num_experts={EXPERTS}", f"model.moe.top_k={TOP_K}", "model.moe.capacity_factor=0"]
    dense = ["model.moe.num_experts=0", f"model.d_ff={TOP_K * base.model.d_ff}", "parallel.expert=1"]
    rows = {"dense": dense, "moe EP=1": [*moe, "parallel.expert=1"]}
    if n > 1:
        rows[f"moe EP={n}"] = [*moe, f"parallel.expert={n}"]
    common = [f"data.path={shards}", "train.micro_batch_size=8", f"train.global_batch_size={8 * n}", *args.overrides]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, extra in rows.items():
                out = Path(tmp) / f"{name.replace(' ', '_').replace('=', '')}_{repeat}"
                runs[name].append(train(args.config, [*common, *extra], n, args.steps, out))
    table = {}
    for name, extra in rows.items():
        params = count_params(load_config(args.config, [*common, *extra]).model)
        tokens_per_s = statistics.median(r[0] for r in runs[name])
        table[name] = {"total_params": params.total, "active_params": params.active, "tokens_per_s": tokens_per_s,
                       "peak_mem_gib": max(r[1] for r in runs[name])}
    for row in table.values():
        row["step_time_vs_dense"] = table["dense"]["tokens_per_s"] / row["tokens_per_s"]
    return table


def main() -> None:
    args = build_parser().parse_args()
    table = training_rows(args)
    sizes = [int(t) for t in args.tokens.split(",")]
    layer = {t: layer_memory_bytes(args.config, t, args.overrides) for t in sizes}
    if args.json:
        print(json.dumps({"nproc": args.nproc, "steps": args.steps, "training": table,
                          "moe_layer_peak_bytes": {str(t): b for t, b in layer.items()},
                          "moe_layer_growth_4x_tokens": [layer[b] / layer[a] for a, b in zip(sizes, sizes[1:])]}))
        return
    print(f"\n{'run':<10}{'total params':>14}{'active':>12}{'tokens/s':>10}{'step time / dense':>19}"
          f"{'peak mem GiB':>14}   ({args.nproc} processes, global batch {8 * args.nproc} sequences, "
          f"{args.steps} steps, after {TIMING_WARMUP_STEPS}, median of {args.repeats})")
    for name, row in table.items():
        print(f"{name:<10}{row['total_params']:>14,}{row['active_params']:>12,}{row['tokens_per_s']:>10,.0f}"
              f"{row['step_time_vs_dense']:>18.2f}x{row['peak_mem_gib']:>14.3f}")
    print(f"\n{'tokens/micro-batch':>18}{'MoE layer peak MiB':>20}{'x previous':>12}{'tokens x':>10}   "
          f"(one MoE MLP, {EXPERTS} experts, top-{TOP_K}, dropless, forward + backward)")
    for i, t in enumerate(sizes):
        growth = f"{layer[t] / layer[sizes[i - 1]]:.2f}" if i else "-"
        tokens_x = f"{t / sizes[i - 1]:.0f}" if i else "-"
        print(f"{t:>18,}{layer[t] / 2**20:>20.1f}{growth:>12}{tokens_x:>10}")


if __name__ == "__main__":
    main()
