"""Downstream tasks of EleutherAI's lm-evaluation-harness on a checkpoint's weights: one model load for all tasks,
each task loaded on its own so that one that fails (a dataset missing offline, a typo) is reported and skipped.

Used by `python -m dist_train.evaluate --tasks ...` and by training's `eval.tasks` (dist_train.train.task_eval).
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.weights import Weights
from dist_train.model.build import build_model
from dist_train.tools.lm_eval_model import DistTrainLM

log = logging.getLogger(__name__)

SHIPPED_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval"
"""The offline tasks made from the bundled corpus (configs/eval: shakespeare_next_line, shakespeare_ppl)."""


class UnknownTasks(ValueError):
    """Task names that neither lm-eval nor the include path knows."""


@dataclass
class TaskResults:
    results: dict[str, Any] | None
    """lm-eval's results (`results`, `versions`, `n-shot`, `configs`, ... and `samples` when logged); None when
    no task ran."""
    failures: dict[str, str] = field(default_factory=dict)
    """Task name -> why it was skipped."""
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Flat `eval/<task>/<metric>` values (lm-eval's `acc,none` -> `acc`; a filter other than `none` is kept
        as a suffix, `exact_match_strict-match`); standard errors and aliases left out."""
        flat = {}
        for task, values in (self.results or {}).get("results", {}).items():
            for key, value in values.items():
                metric, comma, filter_name = key.partition(",")  # metrics are `name,filter`; `alias` etc. are not
                if (not comma or "_stderr" in metric or isinstance(value, bool)
                        or not isinstance(value, (int, float))):
                    continue
                name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
                flat[f"eval/{task}/{name}"] = float(value) if math.isfinite(value) else None
        return flat


def task_manager(include_path: str | Path | None) -> Any:
    """lm-eval's task index (~10 s: it reads every task YAML), with the include path's tasks added."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, verbosity="ERROR")


def check_task_names(names: list[str], manager: Any, key: str) -> None:
    """Raise UnknownTasks naming each unknown task, the closest known names, and where tasks come from."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = [f"{n!r} (closest: {', '.join(difflib.get_close_matches(n, known, n=3)) or 'none'})" for n in unknown]
        raise UnknownTasks(f"{key}: unknown lm-eval task {'; '.join(hints)}. Tasks come from lm-eval's own registry "
                           f"(`lm_eval ls tasks`) and the include path (the offline tasks shipped with dist_train are "
                           f"in {SHIPPED_TASKS})")


def serve(weights: Weights, tokenizer: Any, batch_size: int, device: torch.device) -> DistTrainLM:
    """The weights in a fresh model (fp32, eval mode) on `device`, wrapped for lm-eval."""
    model = weights.load_into(build_model(weights.config.model)).to(device)
    return DistTrainLM(model, tokenizer, weights.config.model.seq_len, batch_size, device)


def run_tasks(lm: DistTrainLM, names: list[str], manager: Any, *, num_fewshot: int | None = None,
              limit: int | None = None, bootstrap_iters: int = 0, log_samples: bool = False) -> TaskResults:
    """Evaluate `lm` on the tasks that load; a task that fails to load, or fails while evaluated, is skipped.
    Each is loaded once, alone (so that one failing does not take the others down), and the loaded tasks and
    groups are handed to lm-eval as they are."""
    from lm_eval.evaluator import simple_evaluate

    start = time.perf_counter()
    failures: dict[str, str] = {}
    loaded: list[Any] = []
    for name in names:
        try:
            loaded += _loaded_objects(manager.load([name]), name)
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise anything (offline, missing files)
            failures[name] = f"{type(e).__name__}: {e}"

    def evaluate(tasks: list[Any]) -> dict[str, Any] | None:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                               bootstrap_iters=bootstrap_iters, log_samples=log_samples, verbosity="ERROR")

    results = None
    if loaded:
        try:
            results = evaluate(loaded)
        except Exception as e:  # noqa: BLE001 - find which task it was: evaluate each alone, keep the ones that work
            log.warning("lm-eval failed on the tasks together (%s: %s); evaluating each alone", type(e).__name__, e)
            results = _one_by_one(evaluate, [n for n in names if n not in failures], failures)
    for name, why in failures.items():
        log.warning("lm-eval task %s skipped: %s", name, why)
    return TaskResults(results=results, failures=failures, seconds=time.perf_counter() - start)


def _loaded_objects(loaded: dict[str, Any], name: str) -> list[Any]:
    """What lm-eval built for the name `name` (TaskManager.load's {"tasks", "groups", ...}): its group, or its
    task(s) (a tag names several)."""
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def _one_by_one(evaluate: Any, names: list[str], failures: dict[str, str]) -> dict[str, Any] | None:
    """Each task by name again (loaded afresh: the failed run may have left the loaded ones half built)."""
    merged: dict[str, Any] | None = None
    for name in names:
        try:
            single = evaluate([name])
        except Exception as e:  # noqa: BLE001
            failures[name] = f"{type(e).__name__}: {e}"
            continue
        if merged is None:
            merged = single
        else:
            for part, value in single.items():
                if isinstance(value, dict) and isinstance(merged.get(part), dict):
                    merged[part].update(value)
    return merged


def format_results(results: dict[str, Any] | None) -> str:
    """lm-eval's own table (what `lm_eval` prints)."""
    if not results:
        return "(no task ran)"
    from lm_eval.utils import make_table

    return make_table(results)
