"""The pieces of `bench/gpu_check.sh`; each appends one JSON line to the results file (`--results`).

    python bench/gpu_check.py train NAME --nproc N [--fp16] [key=value ...]   a short trainer run on the demo data
    python bench/gpu_check.py same-losses NAME A B [--rel R]                   two earlier `train` lines agree
    python bench/gpu_check.py kernels NAME                                      flash SDPA with GQA; TF32 switch
    python bench/gpu_check.py pytest NAME PYTEST_ARGS...                        a GPU test; its printed figures
    python bench/gpu_check.py record NAME < result.json                         a script's --json output, as a line
    python bench/gpu_check.py status NAME EXIT                                  a command's exit status
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.demo_data import DEMO_SHARDS as DATA, ensure_demo_data  # noqa: E402
from dist_train.config import parse_args_with_overrides  # noqa: E402
from dist_train.monitor.jsonl import read_metrics  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"


def append(results: Path, record: dict[str, Any]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def read(results: Path, name: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    found = [r for r in lines if r.get("check") == name]
    return found[-1] if found else {}


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object that starts a line of `text`: DeepSpeed logs to stdout when it is imported (e.g.
    "Setting ds_accelerator to cuda"), so a script's --json output can follow log lines."""
    at = 0
    for line in text.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                found = json.JSONDecoder().raw_decode(text, at)[0]
            except json.JSONDecodeError:
                found = None
            if isinstance(found, dict):
                return found
        at += len(line)
    return None


def train(args: argparse.Namespace) -> dict[str, Any]:
    """A short run of configs/tiny.yaml (or --config) under the deepspeed launcher; its losses, speed, fp16
    loss scales and whether it ended with exit 0."""
    from throughput import deepspeed_cmd, launcher_env  # imports torch: only where needed

    ensure_demo_data(DATA)
    out = Path(tempfile.mkdtemp(prefix=f"gpu_check_{args.name}_"))
    cmd = deepspeed_cmd(args.nproc, 29700 + os.getpid() % 200, REPO / "launch" / "train.py", "--config",
                        args.config, "--resume", "none", f"data.path={DATA}", f"run.out_dir={out}",
                        f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=0",
                        "checkpoint.every=0", "wandb.enabled=false", *args.overrides)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    steps = [r for r in read_metrics(out) if "loss" in r]
    record: dict[str, Any] = {
        "check": args.name, "exit": proc.returncode, "nproc": args.nproc, "overrides": args.overrides,
        "wall_s": round(wall_s, 1), "losses": [r["loss"] for r in steps],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[3:]) if len(steps) > 3 else None,
        "mfu": statistics.median(r["mfu"] for r in steps[3:] if r.get("mfu") is not None)
        if any(r.get("mfu") is not None for r in steps[3:]) else None,
        "grad_norms": [r.get("grad_norm") for r in steps],
        "skipped_steps": steps[-1]["skipped_steps"] if steps else None,
    }
    ok = proc.returncode == 0 and len(steps) == args.steps and all(math.isfinite(x) for x in record["losses"])
    if args.fp16:
        # The scale is logged on every line (ZeRO-0 used to raise there), and grad_norm is of the unscaled
        # gradients: a scaled norm would be ~65,536 times larger.
        record["loss_scales"] = [r.get("loss_scale") for r in steps]
        norms = [g for g in record["grad_norms"] if g is not None]
        ok = ok and all(s is not None for s in record["loss_scales"]) and bool(norms) and max(norms) < 100
    record["ok"] = ok
    if not ok:
        record["stderr_tail"] = proc.stderr[-2000:]
    return record


def cpu_to_gpu_resume(args: argparse.Namespace) -> dict[str, Any]:
    """A ZeRO-1 checkpoint saved by 2 CPU processes (gloo), resumed by 1 process on the GPU: another world size,
    so through DeepSpeed's universal checkpoint, into a fused CUDA AdamW whose `step` the load left on the CPU
    (dist_train.checkpoint.reshard.place_loaded_steps moves it). The resumed steps must train."""
    from throughput import launcher_env

    ensure_demo_data(DATA)
    out = Path(tempfile.mkdtemp(prefix=f"gpu_check_{args.name}_"))
    common = [str(REPO / "launch" / "train.py"), "--config", str(TINY), f"data.path={DATA}", f"run.out_dir={out}",
              "precision=fp32", "deepspeed.zero_stage=1", "train.global_batch_size=8", "train.micro_batch_size=4",
              "train.log_every=1", "train.eval_every=0", f"checkpoint.every={args.steps}", "wandb.enabled=false"]
    cpu_env = dict(launcher_env(), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    saved = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={29900 + os.getpid() % 90}", *common,
                            f"train.max_steps={args.steps}"], cwd=REPO, env=cpu_env, capture_output=True, text=True)
    resumed = subprocess.run([sys.executable, *common, f"train.max_steps={2 * args.steps}"], cwd=REPO,
                             env=launcher_env(), capture_output=True, text=True)
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    after = [losses.get(step) for step in range(args.steps + 1, 2 * args.steps + 1)]
    record: dict[str, Any] = {"check": args.name, "exit_saved": saved.returncode, "exit_resumed": resumed.returncode,
                              "resumed": "resumed from" in resumed.stdout + resumed.stderr,
                              "losses": [losses.get(step) for step in range(1, 2 * args.steps + 1)]}
    record["ok"] = (saved.returncode == resumed.returncode == 0 and record["resumed"]
                    and all(x is not None and math.isfinite(x) for x in after))
    if not record["ok"]:
        record["stderr_tail"] = (saved.stderr if saved.returncode else resumed.stderr)[-2000:]
    return record


def same_losses(args: argparse.Namespace) -> dict[str, Any]:
    a, b = read(args.results, args.a), read(args.results, args.b)
    la, lb = a.get("losses", []), b.get("losses", [])
    worst = max((abs(x - y) / abs(x) for x, y in zip(la, lb)), default=math.inf) if len(la) == len(lb) else math.inf
    return {"check": args.name, "a": args.a, "b": args.b, "max_rel_diff": worst, "ok": worst <= args.rel}


def kernels(args: argparse.Namespace) -> dict[str, Any]:
    """torch's flash SDPA kernel with grouped-query attention (enable_gqa), bf16, seq 2048, forward + backward,
    and the TF32 switch read back through both of torch's APIs (the legacy one raises on a mix)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dist_train.distributed.process_group import configure_matmul_precision
    from dist_train.model.blocks import sdpa_attention

    device = torch.device("cuda", 0)
    q = torch.randn(4, 16, 2048, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 8, 2048, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(4, 8, 2048, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    record: dict[str, Any] = {"check": args.name, "device": torch.cuda.get_device_name(device),
                              "torch": torch.__version__}
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for _ in range(3):
                sdpa_attention(q, k, v, 0.0).sum().backward()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                sdpa_attention(q, k, v, 0.0).sum().backward()
            torch.cuda.synchronize()
        record["flash_gqa_ms"] = (time.perf_counter() - start) / 10 * 1e3
        # fp32 with GQA must reach the memory-efficient kernel (which takes no enable_gqa), not only the math one.
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            sdpa_attention(q32, k32, v32, 0.0).sum().backward()
        record["fp32_gqa_efficient_kernel"] = True
        configure_matmul_precision(device, tf32=True)
        record["tf32_on"] = [torch.get_float32_matmul_precision(), bool(torch.backends.cuda.matmul.allow_tf32)]
        configure_matmul_precision(device, tf32=False)
        record["tf32_off"] = [torch.get_float32_matmul_precision(), bool(torch.backends.cuda.matmul.allow_tf32)]
        record["ok"] = record["tf32_on"] == ["high", True] and record["tf32_off"] == ["highest", False]
    except RuntimeError as e:
        record.update(ok=False, error=str(e)[-1000:])
    return record


def pytest_check(args: argparse.Namespace) -> dict[str, Any]:
    """A pytest run (e.g. the CUDA memory test); the lines it prints that carry figures are kept."""
    from throughput import launcher_env
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args.pytest_args],
                          cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if "GiB" in line or "passed" in line or "failed" in line]
    # A skipped test (no CUDA device seen) measured nothing: only a pass counts.
    passed = proc.returncode == 0 and any(" passed" in line for line in lines)
    record = {"check": args.name, "exit": proc.returncode, "ok": passed, "lines": lines}
    if not passed:
        record["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("name")
    t.add_argument("--nproc", type=int, default=1)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--config", default=str(TINY))
    t.add_argument("--fp16", action="store_true", help="check the loss scale and the unscaled grad_norm")
    t.add_argument("overrides", nargs="*")
    s = sub.add_parser("same-losses")
    s.add_argument("name")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--rel", type=float, default=2e-2)
    c = sub.add_parser("cpu-to-gpu-resume")
    c.add_argument("name")
    c.add_argument("--steps", type=int, default=4, help="steps on the CPU, then as many on the GPU")
    k = sub.add_parser("kernels")
    k.add_argument("name")
    pt = sub.add_parser("pytest")
    pt.add_argument("name")
    pt.add_argument("pytest_args", nargs=argparse.REMAINDER)
    r = sub.add_parser("record")
    r.add_argument("name")
    st = sub.add_parser("status")
    st.add_argument("name")
    st.add_argument("exit", type=int)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # `train NAME --nproc N key=value ...`: argparse alone reads the overrides' list with NAME, before the
    # options, and then refuses the pairs that follow them.
    return parse_args_with_overrides(build_parser(), argv)


def main() -> None:
    args = parse_args()
    if args.command == "train":
        record = train(args)
    elif args.command == "same-losses":
        record = same_losses(args)
    elif args.command == "kernels":
        record = kernels(args)
    elif args.command == "cpu-to-gpu-resume":
        record = cpu_to_gpu_resume(args)
    elif args.command == "pytest":
        record = pytest_check(args)
    elif args.command == "record":
        text = sys.stdin.read()
        result = first_json_object(text)
        record = ({"check": args.name, **result, "ok": True} if result is not None
                  else {"check": args.name, "ok": False, "output_tail": text[-2000:]})
    else:
        record = {"check": args.name, "exit": args.exit, "ok": args.exit == 0}
    append(args.results, record)


if __name__ == "__main__":
    main()
