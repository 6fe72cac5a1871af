"""Downstream evaluation speed: `dist_train.evaluate --tasks` against `lm_eval --model hf` on the run's HF export.

    python bench/eval_speed.py [--run RUN] [--tasks shakespeare_next_line,shakespeare_ppl] [--batch-size 16]
                               [--limit N] [--repeats 3] [--json]

Without --run, a tiny model (configs/tiny.yaml, 100 steps, one process) is trained on the bundled corpus first.
The run is exported once (python -m dist_train.export); then both commands evaluate the same tasks (the offline
ones of configs/eval by default), the same documents, at the same batch size, fp32, as users run them, in
alternation --repeats times (median reported):

    ours      python -m dist_train.evaluate --run RUN --tasks ... --include-path configs/eval --batch-size B
    lm_eval   lm_eval --model hf --model_args pretrained=EXPORT,dtype=float32 --device cpu|cuda --tasks ...
              --include_path configs/eval --batch_size B

requests/s = lm-eval requests (one per multiple-choice option, one per text of a perplexity task) / seconds.
Two times per command: `command` is the wall time of the whole process (imports, task loading, model loading:
what a user waits for); `evaluation` is the time lm-eval itself reports for the evaluation (lm_eval: its results'
total_evaluation_time_seconds; ours: the time of lm-eval's `simple_evaluate` on our model). Goal: ours >= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench.demo_data import DEMO_SHARDS, ensure_demo_data  # noqa: E402

SHIPPED = REPO / "configs" / "eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def environment() -> dict[str, str]:
    from throughput import launcher_env

    return {**launcher_env(), **OFFLINE}


def train_tiny(out: Path, steps: int) -> Path:
    """A small trained model to evaluate: configs/tiny.yaml on the bundled corpus, one process."""
    import socket

    ensure_demo_data()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**environment(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    env.pop("OMP_NUM_THREADS", None)  # one process: all cores
    subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", f"data.path={DEMO_SHARDS}",
                    f"run.out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0",
                    f"checkpoint.every={steps}"], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return out


def timed(cmd: list[str], label: str) -> float:
    env = environment()
    env.pop("OMP_NUM_THREADS", None)  # both commands: torch's default threads
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"[{label}] failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds


def ours(run: Path, args: argparse.Namespace, out: Path) -> tuple[float, float, int]:
    """(command seconds, evaluation seconds, requests) of dist_train.evaluate --tasks."""
    cmd = [sys.executable, "-m", "dist_train.evaluate", "--run", str(run), "--tasks", args.tasks, "--include-path",
           str(SHIPPED), "--batch-size", str(args.batch_size), "--output", str(out), "--log-samples",
           *(["--limit", str(args.limit)] if args.limit else [])]
    seconds = timed(cmd, "ours")
    report = json.loads(out.read_text())
    requests = sum(len(s["arguments"]) for rows in report["samples"].values() for s in rows)
    return seconds, report["dist_train"]["seconds"], requests


def lm_eval_hf(export: Path, args: argparse.Namespace, out: Path, device: str) -> tuple[float, float]:
    """(command seconds, evaluation seconds) of lm_eval --model hf on the export."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
           "--device", device, "--tasks", args.tasks, "--include_path", str(SHIPPED), "--batch_size",
           str(args.batch_size), "--output_path", str(out), *(["--limit", str(args.limit)] if args.limit else [])]
    seconds = timed(cmd, "lm_eval hf")
    results = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)[-1]
    return seconds, float(json.loads(results.read_text())["total_evaluation_time_seconds"])


def measure(args: argparse.Namespace, work: Path) -> dict:
    import torch

    run = args.run or train_tiny(work / "run", args.train_steps)
    export = work / "export"
    subprocess.run([sys.executable, "-m", "dist_train.export", "--run", str(run), "--out", str(export)], cwd=REPO,
                   env=environment(), check=True, capture_output=True, text=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: dict[str, list[tuple[float, float]]] = {"ours": [], "lm_eval_hf": []}
    requests = 0
    for repeat in range(args.repeats):
        command_s, evaluation_s, requests = ours(run, args, work / f"ours_{repeat}.json")
        rows["ours"].append((command_s, evaluation_s))
        rows["lm_eval_hf"].append(lm_eval_hf(export, args, work / f"lm_eval_{repeat}", device))
        print(f"repeat {repeat + 1}/{args.repeats}: ours {rows['ours'][-1][0]:.1f} s, lm_eval hf "
              f"{rows['lm_eval_hf'][-1][0]:.1f} s (whole commands)", flush=True)
    summary = {"tasks": args.tasks, "batch_size": args.batch_size, "limit": args.limit, "requests": requests,
               "device": device, "repeats": args.repeats}
    for name, times in rows.items():
        command_s = statistics.median(t[0] for t in times)
        evaluation_s = statistics.median(t[1] for t in times)
        summary[name] = {"command_s": command_s, "evaluation_s": evaluation_s,
                         "requests_per_s_command": requests / command_s,
                         "requests_per_s_evaluation": requests / evaluation_s}
    for kind in ("command", "evaluation"):
        summary[f"ratio_{kind}"] = (summary["ours"][f"requests_per_s_{kind}"]
                                    / summary["lm_eval_hf"][f"requests_per_s_{kind}"])
    return summary


def table(s: dict) -> str:
    lines = [f"{s['requests']} requests ({s['tasks']}), batch size {s['batch_size']}, {s['device']}, median of "
             f"{s['repeats']}",
             f"{'':<12}{'command s':>11}{'req/s':>9}{'evaluation s':>14}{'req/s':>9}"]
    for name in ("ours", "lm_eval_hf"):
        r = s[name]
        lines.append(f"{name:<12}{r['command_s']:>11.1f}{r['requests_per_s_command']:>9.1f}"
                     f"{r['evaluation_s']:>14.1f}{r['requests_per_s_evaluation']:>9.1f}")
    lines.append(f"ours / lm_eval hf: {s['ratio_command']:.2f}x (whole command), {s['ratio_evaluation']:.2f}x "
                 f"(evaluation); goal >= 1.0x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run folder (default: train configs/tiny.yaml first)")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of the tiny model trained without --run")
    parser.add_argument("--tasks", default="shakespeare_next_line,shakespeare_ppl")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        summary = measure(args, Path(tmp))
    print(json.dumps(summary) if args.json else table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
