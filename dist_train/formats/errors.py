"""The user-facing error of the shared data formats (and of the data preparation commands that write them)."""

from __future__ import annotations


class FormatError(ValueError):
    """Bad input data, a bad shard folder or tokenizer folder; the message names the file, the cause and the fix."""
