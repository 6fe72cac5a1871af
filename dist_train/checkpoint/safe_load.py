"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling calls whatever functions its author named: a checkpoint copied from a
shared folder could run a shell on the reader's account. So every `.pt` file read from a checkpoint, by us or by
DeepSpeed, goes through torch's `weights_only` unpickler, which rebuilds tensors and plain containers only, plus
`ALLOWED_GLOBALS`: the few classes that DeepSpeed and NumPy put in checkpoints, each of them plain data.

DeepSpeed 0.19.8 reads checkpoints with `torch.load(..., weights_only=False)` of its own, in
`runtime/checkpoint_engine/torch_checkpoint_engine.py` (the engine's model and ZeRO optimizer states),
`checkpoint/universal_checkpoint.py`, `runtime/zero/stage3.py` and `runtime/base_optimizer.py` (universal loads),
`utils/zero_to_fp32.py` and `checkpoint/ds_to_universal.py`. Inside `checkpoint_reads()` `torch.load` itself is
replaced, so each of those calls is a `weights_only` load: what is loaded is what is checked, with no second
read. `python -m dist_train.checkpoint.safe_load -m MODULE ARGS` runs a module (the universal conversion) the
same way in a process of its own.

A file that needs any other global is refused with `UnsafeCheckpointError`, naming the file and the global. The
globals a file needs are found by disassembling its pickles (`pickle_globals`: a torch zip's `data.pkl`, or the
pickles of a legacy `torch.save` or plain pickle file) without running them, so the refusal names every global a
file needs, and only the files that need one.
`trust=True` (`--trust-checkpoint`, `checkpoint.trust: true`) loads it as pickle does, after printing which file
and which globals were trusted. `check_folder` scans the pickles of a checkpoint folder without running them, so
a tampered checkpoint is refused on every rank before any engine reads it.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import importlib
import pickle
import pickletools
import re
import runpy
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import _weights_only_unpickler
from torch.serialization import safe_globals

# pickled name -> (module, attribute) of the object it stands for; resolved only when a load needs them.
ALLOWED_GLOBALS = {
    # np.random.get_state() in the client files written before the JSON format (numpy 2 and numpy 1 names)
    "numpy._core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),
    "numpy.core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),
    "numpy.ndarray": ("numpy", "ndarray"),
    "numpy.dtype": ("numpy", "dtype"),
    "numpy.dtypes.UInt32DType": ("numpy.dtypes", "UInt32DType"),  # the key's dtype object, rebuilt by BUILD
    # DeepSpeed's ZeRO and mixed-precision optimizer states: attributes that are numbers, flags and torch dtypes
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": ("deepspeed.runtime.fp16.loss_scaler",
                                                            "DynamicLossScaler"),
    "deepspeed.runtime.zero.config.ZeroStageEnum": ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    "deepspeed.utils.tensor_fragment.fragment_address": ("deepspeed.utils.tensor_fragment", "fragment_address"),
}

TRUST_HINT = ("if you trust where this checkpoint came from, pass --trust-checkpoint (training: or set "
              "checkpoint.trust: true) to load it the unsafe way")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs globals outside the allowlist; loading it could run code."""

    def __init__(self, problems: dict[str, list[str]], every_rank: bool = False):
        self.problems = problems
        self.every_rank = every_rank  # raised by every rank at one point: the process group can be shut down
        listed = "; ".join(f"{file} needs {', '.join(names)}" for file, names in problems.items())
        super().__init__(f"refused to load a checkpoint that could run code when read: {listed} (outside the "
                         f"allowlist of dist_train.checkpoint.safe_load); {TRUST_HINT}")


def _allowed_objects() -> list[tuple[Any, str]]:
    objects = []
    for name, (module, attribute) in ALLOWED_GLOBALS.items():
        try:
            objects.append((getattr(importlib.import_module(module), attribute), name))
        except (ImportError, AttributeError):  # e.g. deepspeed absent: files naming it are then refused
            continue
    return objects


_LEGACY_PICKLES = 5
"""Pickles at the start of a legacy (non-zip) `torch.save` file: magic number, protocol, system info, the object,
its storage keys; the storages' raw bytes follow. A plain pickle file holds one."""


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The name an unpickler loads for a GLOBAL written by Python 2 or at protocol 2 (`__builtin__.eval` is
    `builtins.eval`), as pickle's and torch's own unpicklers map it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _add_globals_of_one_pickle(stream: IO[bytes], found: set[str]) -> None:
    """Add the globals one pickle names to `found`, as they come (a pickle cut short keeps those before the cut):
    GLOBAL and INST carry theirs; STACK_GLOBAL (protocol 4+) takes module and name from the two strings pushed
    before it, which may come from the memo, so string pushes and memo entries are followed (no other value
    matters). ValueError at the end of the stream or at bytes that are no pickle."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # what each op pushed, a string or None
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            found.add(".".join(_python3_name(*arg.split(" "))))
        elif op.name == "STACK_GLOBAL":
            module, name = pushed[-2:] if len(pushed) >= 2 else (None, None)
            found.add(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str)
                      else "(a global this scan cannot name)")
        elif op.name.startswith("EXT"):
            found.add(f"copyreg extension {arg}")
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.stack_after:
            pushed.append(arg if isinstance(arg, str) else None)


def pickle_globals(path: str | Path) -> set[str]:
    """Every global the pickles of a checkpoint file name, read without running them: a torch zip's data.pkl, or
    the first pickles of any other file (the rest of a legacy file is raw tensor bytes). Like torch.load, a file is
    a zip when it starts as one. Bytes that are no pickle end the scan (their reader refuses them)."""
    found: set[str] = set()
    with open(path, "rb") as stream:
        is_zip = stream.read(4) == b"PK\x03\x04"
        stream.seek(0)
        if is_zip:
            with zipfile.ZipFile(stream) as archive:
                for name in [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"][:1]:
                    with archive.open(name) as pkl, contextlib.suppress(ValueError):
                        _add_globals_of_one_pickle(pkl, found)
            return found
        for _ in range(_LEGACY_PICKLES):
            try:
                _add_globals_of_one_pickle(stream, found)
            except ValueError:
                break
    return found


def needed_globals(path: str | Path) -> list[str]:
    """The globals of `path` outside torch's weights_only set and ALLOWED_GLOBALS (what a safe load would refuse).
    torch's set is private API, the one its own `get_unsafe_globals_in_checkpoint` compares with."""
    allowed = set(_weights_only_unpickler._get_allowed_globals()) | set(ALLOWED_GLOBALS)
    return sorted(pickle_globals(path) - allowed)


def _unsafe_globals(file: Any, error: Exception) -> list[str]:
    """The globals a refused file needs: all of them from a file on disk, else the one torch's error names."""
    if isinstance(file, (str, Path)):
        with contextlib.suppress(OSError, zipfile.BadZipFile):  # unreadable: its reader says why
            return needed_globals(file)
    return sorted(set(re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(error))))


def safe_load(file: Any, *args: Any, trust: bool = False, **kwargs: Any) -> Any:
    """`torch.load` as a weights_only load under the allowlist; a refused file raises UnsafeCheckpointError,
    or with `trust` is loaded as pickle does (printed)."""
    kwargs.pop("weights_only", None)
    if kwargs.get("pickle_module") is None:
        kwargs.pop("pickle_module", None)  # weights_only refuses any pickle_module argument, even None
    try:
        with safe_globals(_allowed_objects()):
            return _torch_load(file, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(file, e)
        if not needed:
            raise  # not a question of trust (a truncated or corrupt file)
        if not trust:
            raise UnsafeCheckpointError({str(file): needed}) from None
    print(f"warning: --trust-checkpoint: loading {file} with pickle, which may run code: it needs "
          f"{', '.join(needed)}", file=sys.stderr, flush=True)
    if hasattr(file, "seek"):
        file.seek(0)
    return _torch_load(file, *args, weights_only=False, **kwargs)


_torch_load = torch.load


@contextlib.contextmanager
def checkpoint_reads(trust: bool = False) -> Iterator[None]:
    """Every `torch.load` inside (ours and DeepSpeed's) is a `safe_load`."""
    previous = torch.load

    def guarded(file: Any, *args: Any, **kwargs: Any) -> Any:
        return safe_load(file, *args, trust=trust, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = previous


def checkpoint_files(folder: Path) -> list[Path]:
    """The `.pt` files of a checkpoint folder, those of its universal subfolder included."""
    return sorted(folder.rglob("*.pt"))


def unsafe_files(files: Iterable[Path]) -> dict[str, list[str]]:
    """{file: globals outside the allowlist} of exactly the `files` that need some, found by disassembling their
    pickles (nothing is run, no tensor is read; an unreadable file is left to its reader, whose reads are guarded
    anyway: this is for an early refusal that names every file)."""
    problems = {}
    for file in files:
        try:
            needed = needed_globals(file)
        except (OSError, zipfile.BadZipFile):
            continue
        if needed:
            problems[str(file)] = needed
    return problems


def refuse_or_trust(problems: dict[str, list[str]], trust: bool, report: bool = True,
                    every_rank: bool = False) -> None:
    """Raise UnsafeCheckpointError for `problems` unless `trust`; then print (if `report`) what is trusted."""
    if problems and not trust:
        raise UnsafeCheckpointError(problems, every_rank)
    for file, names in problems.items() if report else ():
        print(f"warning: --trust-checkpoint: {file} will be loaded with pickle, which may run code: it needs "
              f"{', '.join(names)}", file=sys.stderr, flush=True)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-checkpoint`, worded the same in every command that reads checkpoints."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoint files that need globals outside the safe allowlist: they may run "
                             "code when read, so only for a checkpoint whose source you trust")


def check_folder(folder: Path, trust: bool = False) -> None:
    """Refuse a checkpoint folder holding a file that needs a global outside the allowlist."""
    refuse_or_trust(unsafe_files(checkpoint_files(folder)), trust)


def main(argv: list[str] | None = None) -> int:
    """`python -m dist_train.checkpoint.safe_load [--trust-checkpoint] -m MODULE ARGS...`"""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m dist_train.checkpoint.safe_load",
                                     usage="%(prog)s [--trust-checkpoint] -m MODULE [ARGS ...]",
                                     description="Run a Python module with every torch.load a weights_only load "
                                                 "under the checkpoint allowlist (e.g. DeepSpeed's ds_to_universal).")
    add_trust_argument(parser)
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
        parser.error("name the module to run: -m MODULE [ARGS ...]")
    at = argv.index("-m")  # everything after the module name is its own
    args = parser.parse_args(argv[:at])
    module, sys.argv = argv[at + 1], [argv[at + 1], *argv[at + 2:]]
    try:
        with checkpoint_reads(trust=args.trust_checkpoint):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
