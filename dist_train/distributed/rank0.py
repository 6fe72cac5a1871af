"""The one gate for side effects that only rank 0 performs (printing, files, W&B).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from dist_train.distributed.collectives import all_gather_objects
from dist_train.distributed.environment import ProcessPlace
from dist_train.distributed.process_group import _wait_for_rank0_group

T = TypeVar("T")


class Rank0:
    """The one gate for side effects that only rank 0 performs (printing, files, W&B)."""

    def __init__(self, place: ProcessPlace):
        self.active = place.is_rank0

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if self.active else None

    def run_while_others_wait(self, fn: Callable[..., Any], *args: Any) -> None:
        """Rank 0 runs `fn` (shared files: rename, delete, convert) while the other ranks wait for it; an
        error on rank 0 is raised on every rank, so that none of them waits forever for a rank that died."""
        group = _wait_for_rank0_group()  # before the work: every rank joins it at the same moment
        error = None
        if self.active:
            try:
                fn(*args)
            except (OSError, RuntimeError) as e:
                error = str(e)
        errors = [e for e in all_gather_objects(error, group) if e]
        if errors:
            raise RuntimeError(errors[0])

    def share(self, fn: Callable[..., T], *args: Any) -> T:
        """Rank 0 runs `fn` (reads or writes shared files) and every rank gets its result (picklable); an error on
        rank 0 is raised on every rank, as in run_while_others_wait."""
        group = _wait_for_rank0_group()
        outcome: tuple[Any, str | None] = (None, None)
        if self.active:
            try:
                outcome = (fn(*args), None)
            except (OSError, RuntimeError) as e:
                outcome = (None, str(e))
        result, error = all_gather_objects(outcome, group)[0]
        if error:
            raise RuntimeError(error)
        return result

    def print(self, *args: Any) -> None:
        if self.active:
            print(*args, flush=True)
