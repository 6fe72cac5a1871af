"""Tools over a finished run folder: export to transformers (export), average the last checkpoints (average),
validation loss / perplexity (evaluate). Run them as `python -m dist_train.export|average|evaluate`.

Not here: reading checkpoint weights (`dist_train.checkpoint.weights`).
"""

import contextlib
import logging
import sys


def deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout (its handler holds the stdout of import time, so redirecting
    `sys.stdout` later does not help), and a tool's stdout carries `--json`: point the handler at stderr."""
    with contextlib.redirect_stdout(sys.stderr):  # importing DeepSpeed logs its accelerator
        from deepspeed.utils import logger

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)
