"""`python -m dist_train.evaluate --tasks ...`: a checkpoint (or a --weights folder) on lm-evaluation-harness tasks.

    python -m dist_train.evaluate --run RUN [--step N | --weights DIR] --tasks T1,T2 [--include-path DIR]
        [--num-fewshot K] [--limit N] [--batch-size B] [--json] [--output PATH] [--log-samples]

Our model is served to lm-eval directly (dist_train.tools.lm_eval_model: no export, the model loaded once for all
tasks) with the run's tokenizer. Prints lm-eval's table; --output writes lm-eval's results JSON (plus a
`dist_train` entry: weights, step, skipped tasks, seconds), --log-samples adds every request's answer to it
(`samples`). A task that cannot run (its dataset missing offline) is reported and skipped; the exit code is then 1.
Decoder-only models: an encoder-decoder is refused (export it and run `lm_eval --model hf --model_args
pretrained=EXPORT,backend=seq2seq`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.weights import Weights
from dist_train.config import Config
from dist_train.tools.downstream import (
    SHIPPED_TASKS,
    TaskResults,
    UnknownTasks,
    check_task_names,
    format_results,
    run_tasks,
    serve,
    task_manager,
)

DEFAULT_BOOTSTRAP_ITERS = 100_000  # lm_eval's own default: standard errors by bootstrap where no formula exists


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("downstream tasks (lm-evaluation-harness)")
    group.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t],
                       help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy, or the offline "
                            f"shakespeare_next_line,shakespeare_ppl with --include-path {SHIPPED_TASKS}")
    group.add_argument("--include-path", type=Path, help="a folder of extra lm-eval task YAMLs")
    group.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    group.add_argument("--limit", type=int, help="the first N documents of each task (default: all)")
    group.add_argument("--output", type=Path, help="write lm-eval's results JSON here")
    group.add_argument("--log-samples", action="store_true", help="add each request's answer to --output")
    group.add_argument("--bootstrap-iters", type=int, default=DEFAULT_BOOTSTRAP_ITERS,
                       help="bootstrap iterations for standard errors (0: none, faster)")


def _refusal(args: argparse.Namespace, sources: list[Weights]) -> str | None:
    if importlib.util.find_spec("lm_eval") is None:
        return "--tasks needs EleutherAI's lm-evaluation-harness: pip install 'dist-train[eval]'"
    if len(sources) != 1:
        return "--tasks evaluates one set of weights: give --run RUN [--step N] or one --weights DIR"
    if sources[0].config.model.arch != "decoder":
        return ("--tasks serves decoder-only models to lm-eval; for an encoder-decoder export the run "
                "(python -m dist_train.export) and run `lm_eval --model hf --model_args pretrained=EXPORT,"
                "backend=seq2seq`")
    if args.include_path is not None and not args.include_path.is_dir():
        return f"--include-path {args.include_path} is not a folder"
    for flag, value, low in (("--num-fewshot", args.num_fewshot, 0), ("--limit", args.limit, 1),
                             ("--bootstrap-iters", args.bootstrap_iters, 0)):
        if value is not None and value < low:
            return f"{flag} must be at least {low}, not {value}"
    return None


def load_run_tokenizer(cfg: Config) -> Any:
    """The tokenizer named by the manifest of the run's (first) data source."""
    from dist_train.formats.tokenizer_folder import load_tokenizer
    from dist_train.tools.export import tokenizer_path

    path = tokenizer_path(cfg)
    if path is None:
        raise FileNotFoundError(f"no tokenizer: the manifest of the run's data ({cfg.data.path or 'data.sources'}) "
                                f"cannot be read (run this from the folder training started in)")
    return load_tokenizer(path)


def evaluate_tasks(args: argparse.Namespace, sources: list[Weights], device: torch.device) -> int:
    refusal = _refusal(args, sources)
    if refusal:
        print(f"evaluate: {refusal}", file=sys.stderr)
        return 2
    weights = sources[0]
    try:
        tokenizer = load_run_tokenizer(weights.config)
        manager = task_manager(args.include_path)
        check_task_names(args.tasks, manager, "--tasks")
    except (FileNotFoundError, UnknownTasks) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    lm = serve(weights, tokenizer, args.batch_size, device)
    outcome = run_tasks(lm, args.tasks, manager, num_fewshot=args.num_fewshot, limit=args.limit,
                        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples)
    report = results_json(weights, outcome)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, default=_plain))
    else:
        step = weights.meta.get("step")
        print(f"{weights.source}{f' (step {step})' if step is not None else ''}: {lm.batch_size} requests per "
              f"batch, {outcome.seconds:.1f} s\n{format_results(outcome.results)}")
    for name, why in outcome.failures.items():
        print(f"evaluate: task {name} skipped: {why}", file=sys.stderr)
    return 1 if outcome.failures else 0


def results_json(weights: Weights, outcome: TaskResults) -> dict[str, Any]:
    report = dict(outcome.results or {})
    report["dist_train"] = {"weights": str(weights.source), "step": weights.meta.get("step"),
                            "metrics": outcome.metrics(), "skipped_tasks": outcome.failures,
                            "seconds": outcome.seconds}
    return report


def _plain(value: Any) -> Any:
    """What json cannot write as is (numpy numbers, sets, tensors, callables in task configs)."""
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)
