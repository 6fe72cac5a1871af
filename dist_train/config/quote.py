"""`quote(value)`: a user's value as an error message shows it, bounded in size whatever the value is (and `clip`
for text quoted as it is).

A config value can be a huge or deeply nested structure (a YAML alias expands a 400-byte file into millions of
values): its full repr made a 76 MB message, or a MemoryError before any message at all.
"""

from __future__ import annotations

import reprlib

QUOTE_CHARS = 120
"""At most this many characters of a value in a message; enough for a path or a short list."""

_REPR = reprlib.Repr()  # Python 3.11's Repr takes no arguments: set the limits on it
_REPR.maxlevel = 2
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxother = QUOTE_CHARS
_REPR.maxlong = 40


def quote(value: object) -> str:
    """repr(value), shortened with `...` where it is long; never walks more of the value than it shows."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<a {value.bit_length()}-bit integer>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return clip(text)


def clip(text: str) -> str:
    """`text` (a user's own words, e.g. an override) cut to QUOTE_CHARS characters with `...`."""
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + "..."
