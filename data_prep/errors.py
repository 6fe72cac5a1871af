"""The user-facing error of the data preparation commands, and how a command reports it.

A `DataPrepError` is a mistake the user can fix (a missing file, a bad record, a full output folder):
its message says what is wrong, where (file, line, key) and what to do. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from dist_train.formats.errors import FormatError

# One error type for the data commands and the formats they write (manifest, tokenizer folder): a mistake the
# user can fix, printed as one line.
DataPrepError = FormatError


def run_command(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a command's `main`, printing a `DataPrepError` as one line instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        code = main(argv)
    except DataPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)
