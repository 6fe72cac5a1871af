"""Whether a transformers config file asks for custom code: dist_train never runs it (trust_remote_code is off),
so the loaders that fail on such a file say why instead of passing on transformers' error."""

from __future__ import annotations

import json
from pathlib import Path


def custom_code_classes(json_file: Path) -> object:
    """The `auto_map` of a config.json / tokenizer_config.json (classes from Python files next to it), if any."""
    try:
        return json.loads(json_file.read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
