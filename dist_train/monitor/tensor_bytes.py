"""The most tensor bytes alive at once while some code runs, counted op by op: a device-independent peak (on the
CPU the resident set also counts what the allocator keeps). Used by tests and benchmarks that bound memory.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class NewTensorBytes(TorchDispatchMode):
    """Bytes of the tensors that torch ops create while the mode is on (outputs that are not views of an input),
    counted from creation until the tensor object is released; `peak` is the most that was alive at once.
    Memory-mapped files are not counted: their pages belong to the files, not to the process."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, size)
        return out

    def _release(self, size: int) -> None:
        self.live -= size
