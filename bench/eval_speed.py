"""Downstream evaluation speed: our model served to lm-eval against lm-eval's own `hf` model on the run's export.

    python bench/eval_speed.py [--run RUN] [--tasks shakespeare_next_line,shakespeare_ppl] [--batch-size 16]
                               [--limit N] [--repeats 3] [--json]

Without --run, a tiny model (configs/tiny.yaml, 100 steps, one process) is trained on the bundled corpus first.
The run is exported once (python -m dist_train.export). Then, the same tasks (the offline ones of configs/eval by
default), documents and batch size, fp32:

1. evaluation (the figure): in one process, lm-eval's `simple_evaluate` on our model
   (`dist_train.tools.lm_eval_model.DistTrainLM`, what `dist_train.evaluate --tasks` runs) and on
   `HFLM(pretrained=EXPORT)` (what `lm_eval --model hf` runs), both loaded once, with one task index, in
   alternation --repeats times; the median time of each;
2. whole commands, once each: `python -m dist_train.evaluate --run RUN --tasks ...` and `lm_eval --model hf
   --model_args pretrained=EXPORT,dtype=float32 ...`, start-up, task index and model loading included.

requests/s = lm-eval requests (one per multiple-choice option, one per text of a perplexity task) / seconds.
Goal: ours >= 1.0x lm_eval hf in the evaluation.
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
from bench.ports import free_port  # noqa: E402

SHIPPED = REPO / "configs" / "eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def environment() -> dict[str, str]:
    from throughput import launcher_env

    return {**launcher_env(), **OFFLINE}


def train_tiny(out: Path, steps: int) -> Path:
    """A small trained model to evaluate: configs/tiny.yaml on the bundled corpus, one process."""
    ensure_demo_data()
    env = {**environment(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
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


def in_process(run: Path, export: Path, args: argparse.Namespace, device: str) -> tuple[dict[str, list[float]], int]:
    """Seconds of lm-eval's simple_evaluate on each model, alternated; and the number of requests."""
    import torch
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from dist_train.checkpoint.weights import open_weights
    from dist_train.tools.downstream import serve, task_manager
    from dist_train.tools.task_cli import load_run_tokenizer

    manager = task_manager(SHIPPED)
    weights = open_weights(run)
    models = {"ours": serve(weights, load_run_tokenizer(weights.config), args.batch_size, torch.device(device)),
              "lm_eval_hf": HFLM(pretrained=str(export), dtype="float32", device=device, batch_size=args.batch_size)}
    times: dict[str, list[float]] = {name: [] for name in models}
    requests = 0
    for repeat in range(args.repeats):
        for name, lm in models.items():
            start = time.perf_counter()
            results = simple_evaluate(model=lm, tasks=args.tasks.split(","), task_manager=manager, limit=args.limit,
                                      verbosity="ERROR")
            times[name].append(time.perf_counter() - start)
            requests = sum(len(s["arguments"]) for rows in results["samples"].values() for s in rows)
        print(f"repeat {repeat + 1}/{args.repeats}: ours {times['ours'][-1]:.1f} s, lm_eval hf "
              f"{times['lm_eval_hf'][-1]:.1f} s", flush=True)
    return times, requests


def commands(run: Path, export: Path, args: argparse.Namespace, device: str, work: Path) -> dict[str, float]:
    limit = ["--limit", str(args.limit)] if args.limit else []
    ours = [sys.executable, "-m", "dist_train.evaluate", "--run", str(run), "--tasks", args.tasks, "--include-path",
            str(SHIPPED), "--batch-size", str(args.batch_size), *limit]
    theirs = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
              "--device", device, "--tasks", args.tasks, "--include_path", str(SHIPPED), "--batch_size",
              str(args.batch_size), "--output_path", str(work / "lm_eval"), *limit]
    return {"ours": timed(ours, "ours"), "lm_eval_hf": timed(theirs, "lm_eval hf")}


def measure(args: argparse.Namespace, work: Path) -> dict:
    import torch

    run = args.run or train_tiny(work / "run", args.train_steps)
    export = work / "export"
    subprocess.run([sys.executable, "-m", "dist_train.export", "--run", str(run), "--out", str(export)], cwd=REPO,
                   env=environment(), check=True, capture_output=True, text=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    times, requests = in_process(run, export, args, device)
    whole = commands(run, export, args, device, work)
    summary = {"tasks": args.tasks, "batch_size": args.batch_size, "limit": args.limit, "requests": requests,
               "device": device, "repeats": args.repeats}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        summary[name] = {"evaluation_s": median, "requests_per_s": requests / median, "command_s": whole[name]}
    summary["ratio"] = summary["ours"]["requests_per_s"] / summary["lm_eval_hf"]["requests_per_s"]
    summary["ratio_command"] = whole["lm_eval_hf"] / whole["ours"]
    return summary


def table(s: dict) -> str:
    lines = [f"{s['requests']} requests ({s['tasks']}), batch size {s['batch_size']}, {s['device']}, median of "
             f"{s['repeats']}",
             f"{'':<12}{'evaluation s':>14}{'requests/s':>12}{'whole command s':>17}"]
    for name in ("ours", "lm_eval_hf"):
        r = s[name]
        lines.append(f"{name:<12}{r['evaluation_s']:>14.1f}{r['requests_per_s']:>12.1f}{r['command_s']:>17.1f}")
    lines.append(f"ours / lm_eval hf: {s['ratio']:.2f}x requests/s in the evaluation (goal >= 1.0x), "
                 f"{s['ratio_command']:.2f}x for the whole command")
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
