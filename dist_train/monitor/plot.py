"""Training curves of one or more runs from their `metrics.jsonl`, in one PNG.

    python -m dist_train.plot runs/tiny --out runs/tiny/curves.png
    python -m dist_train.plot runs/a runs/b --out compare.png      # several runs in one figure

Panels: loss vs tokens (training solid, validation dashed with markers), learning rate vs step, training
throughput (tokens/s) vs step, and one panel per downstream task a run logged (`eval.tasks`: its metrics vs tokens,
a log scale where perplexities sit beside accuracies). Each run keeps one colour in every panel; the legend names
it by its folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.monitor.jsonl import MetricsFileError, read_metrics


class PlotError(ValueError):
    """A run folder that cannot be plotted; the message says which and why."""


def load_run(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """{'train': records with a loss, 'val': records with a val_loss, 'tasks': records with eval/<task>/<metric>
    values} of one run, each sorted by step."""
    if not (run_dir / "metrics.jsonl").exists():
        raise PlotError(f"{run_dir} has no metrics.jsonl: is it a run folder (run.out_dir) that has logged "
                        f"at least one step?")
    try:
        records = read_metrics(run_dir)
    except MetricsFileError as e:
        raise PlotError(str(e)) from None
    train = sorted((r for r in records if r.get("loss") is not None), key=lambda r: r["step"])
    val = sorted((r for r in records if r.get("val_loss") is not None), key=lambda r: r["step"])
    if not train and not val:
        raise PlotError(f"{run_dir}/metrics.jsonl has no training or validation losses yet")
    tasks = sorted((r for r in records if any(k.startswith("eval/") for k in r)), key=lambda r: r["step"])
    return {"train": train, "val": val, "tasks": tasks}


def _task_metrics(runs: dict[Path, dict[str, list[dict[str, Any]]]]) -> dict[str, list[str]]:
    """task -> its metric names, over all runs, in the order first logged."""
    tasks: dict[str, list[str]] = {}
    for run in runs.values():
        for record in run["tasks"]:
            for key in record:
                if key.startswith("eval/"):
                    task, metric = key.removeprefix("eval/").rsplit("/", 1)
                    if metric not in tasks.setdefault(task, []):
                        tasks[task].append(metric)
    return tasks


def _plot_tasks(axes: list[Any], runs: dict[Path, dict[str, list[dict[str, Any]]]],
                tasks: dict[str, list[str]]) -> None:
    for ax, (task, metrics) in zip(axes, tasks.items()):
        largest = 0.0
        for i, (run_dir, run) in enumerate(runs.items()):
            for style, metric in zip(("o-", "s--", "^:", "d-."), metrics):
                points = [(r["tokens"], r[f"eval/{task}/{metric}"]) for r in run["tasks"]
                          if r.get(f"eval/{task}/{metric}") is not None]
                if points:
                    largest = max(largest, max(v for _, v in points))
                    ax.plot(*zip(*points), style, color=f"C{i % 10}", label=f"{run_dir.resolve().name} {metric}")
        if largest > 10:
            ax.set_yscale("log")  # perplexities beside accuracies
        ax.set_title(f"task: {task}")
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def _val_tokens(train: list[dict[str, Any]], val: list[dict[str, Any]]) -> list[float]:
    """Tokens seen at each validation step (eval records written before evals carried `tokens` lack it:
    interpolate from the training records, where tokens grow linearly with steps)."""
    if all("tokens" in r for r in val):
        return [r["tokens"] for r in val]
    if not train:
        return [float("nan")] * len(val)
    steps = [r["step"] for r in train]
    tokens = [r["tokens"] for r in train]
    return [float(np.interp(r["step"], steps, tokens)) for r in val]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    runs = {d: load_run(d) for d in run_dirs}  # refuses a bad run before the slow import of matplotlib
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    tasks = _task_metrics(runs)
    fig, axes = plt.subplots(1, 3 + len(tasks), figsize=(5 * (3 + len(tasks)), 4.5), dpi=100)
    ax_loss, ax_lr, ax_tps = axes[:3]
    _plot_tasks(list(axes[3:]), runs, tasks)
    for i, (run_dir, run) in enumerate(runs.items()):
        color, name = f"C{i % 10}", run_dir.resolve().name
        train, val = run["train"], run["val"]
        if train:
            steps = [r["step"] for r in train]
            ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color,
                         label=f"{name} train")
            ax_lr.plot(steps, [r["lr"] for r in train], color=color, label=name)
            ax_tps.plot(steps, [r["tokens_per_s"] for r in train], color=color, label=name)
        if val:
            ax_loss.plot(_val_tokens(train, val), [r["val_loss"] for r in val], "o--", color=color,
                         label=f"{name} val")
    for ax, title, xlabel, ylabel in ((ax_loss, "loss", "tokens", "cross-entropy (nats/token)"),
                                      (ax_lr, "learning rate", "step", "lr"),
                                      (ax_tps, "throughput", "step", "tokens/s (all ranks)")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_loss.xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M, 3G tokens: readable at any scale
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--json", action="store_true", help="print {out, runs} as JSON")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.out)
    except PlotError as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"out": str(out.resolve()), "runs": [str(r) for r in args.runs]}))
    else:
        print(f"wrote {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
