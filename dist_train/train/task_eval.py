"""lm-evaluation-harness tasks during training (`eval.tasks`), on the checkpoints the run publishes.

Rank 0 reads the checkpoint it has just published (verified, as `dist_train.evaluate` reads it) into a fresh model
on its device and runs the tasks while the other ranks wait (lm-eval shards requests over ranks only for models
it loads itself; a fresh model from the files also serves every layout alike: ZeRO-3, tensor, sequence and expert
parallelism). It logs `eval/<task>/<metric>` and `eval_tasks_s` (the time is kept out of the step times, so
tokens/s and MFU stay what training did). A task that fails is logged as an `eval_task_failed` event and skipped:
it never stops training. lm-eval's task index is built once, at start, where unknown task names are refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_train.checkpoint.weights import open_weights
from dist_train.config import Config, ConfigError
from dist_train.distributed.rank0 import Rank0
from dist_train.monitor.metrics import MetricsLogger

if TYPE_CHECKING:  # lm-eval is imported only by runs with eval.tasks
    from dist_train.tools.downstream import TaskResults


class TaskEvaluation:
    """What eval.tasks needs between checkpoints: lm-eval's task index and the tokenizer (rank 0 only)."""

    def __init__(self, cfg: Config, rank0: Rank0, device: torch.device):
        self.cfg, self.rank0, self.device = cfg, rank0, device
        self.every = cfg.eval.every or cfg.checkpoint.every
        self.manager: Any = None
        self.tokenizer: Any = None
        self.last_step: int | None = None
        error = rank0.share(self._prepare)  # every rank learns of a refusal, so that none waits for rank 0
        if error:
            raise ConfigError(error, ("eval.tasks",))

    def _prepare(self) -> str | None:
        from dist_train.tools.downstream import UnknownTasks, check_task_names, task_manager
        from dist_train.tools.task_cli import load_run_tokenizer

        self.manager = task_manager(self.cfg.eval.include_path)
        try:
            check_task_names(self.cfg.eval.tasks, self.manager, "eval.tasks")
            self.tokenizer = load_run_tokenizer(self.cfg)
        except (UnknownTasks, FileNotFoundError) as e:
            return str(e)
        return None

    def due(self, step: int, saved_step: int) -> bool:
        """At every eval.every-th step whose checkpoint is saved, once."""
        return step % self.every == 0 and saved_step == step and self.last_step != step

    def run(self, run_dir: Path, step: int, tokens: int, logger: MetricsLogger) -> None:
        """Evaluate the published checkpoint of `step` on rank 0 while the other ranks wait."""
        self.last_step = step
        self.rank0.run_while_others_wait(self._evaluate, run_dir, step, tokens, logger)

    def _evaluate(self, run_dir: Path, step: int, tokens: int, logger: MetricsLogger) -> None:
        try:
            outcome = self._run_tasks(run_dir, step)
        except Exception as e:  # noqa: BLE001 - whatever fails here (the checkpoint, lm-eval) never stops training
            logger.event({"step": step, "event": "eval_task_failed", "task": ",".join(self.cfg.eval.tasks),
                          "error": f"{type(e).__name__}: {e}"})
            print(f"warning: eval.tasks failed at step {step} and were skipped: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            return
        metrics = outcome.metrics()
        logger.log({"step": step, "tokens": tokens, **metrics, "eval_tasks_s": outcome.seconds})
        for name, why in outcome.failures.items():
            logger.event({"step": step, "event": "eval_task_failed", "task": name, "error": why})
            print(f"warning: eval task {name} failed at step {step} and was skipped: {why}", file=sys.stderr,
                  flush=True)
        shown = " | ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items() if v is not None)
        print(f"step {step} | {shown or 'no task ran'} | {outcome.seconds:.1f} s", flush=True)

    def _run_tasks(self, run_dir: Path, step: int) -> TaskResults:
        from dist_train.tools.downstream import run_tasks, serve

        e = self.cfg.eval
        weights = open_weights(run_dir, step, trust=self.cfg.checkpoint.trust, verify=self.cfg.checkpoint.verify)
        lm = serve(weights, self.tokenizer, e.batch_size, self.device)
        try:
            return run_tasks(lm, e.tasks, self.manager, num_fewshot=e.num_fewshot, limit=e.limit)
        finally:
            del lm, weights
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the evaluation's copy of the model goes before training goes on
