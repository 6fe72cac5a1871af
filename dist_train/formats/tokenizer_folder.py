"""A tokenizer folder: a local HF tokenizer that `transformers.AutoTokenizer` loads, with an EOS token.

`data_prep.tokenizer` writes one; `data_prep.shard` and the export load it. Never from the hub, never with
remote code.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dist_train.formats.custom_code import custom_code_classes
from dist_train.formats.errors import FormatError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenizer_folder(path: str | os.PathLike) -> Path:
    """`path` as a tokenizer folder; refuse a file (name the folder that holds it) or a missing folder."""
    folder = Path(path).expanduser()
    if folder.is_file():
        raise FormatError(f"{path} is a file: a tokenizer is the folder that holds it (and its "
                          f"tokenizer_config.json); pass the folder {folder.parent}")
    if not folder.is_dir():
        raise FormatError(f"tokenizer folder {path} does not exist (make one with "
                          f"`python -m data_prep.tokenizer --input ... --vocab-size N --out DIR`)")
    return folder


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer folder; refuse one that does not load or has no EOS token."""
    from transformers import AutoTokenizer  # imported here: hashing a folder needs no transformers (1-2 s)

    folder = tokenizer_folder(path)
    try:
        # trust_remote_code=False, not unset: unset, transformers asks on a terminal whether to run the code.
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        auto_map = custom_code_classes(folder / "tokenizer_config.json")
        if auto_map:
            raise FormatError(f"tokenizer folder {path} names custom code ({auto_map} in tokenizer_config.json), "
                              f"which dist_train never runs (trust_remote_code is off): use a tokenizer class "
                              f"built into transformers (e.g. one made by `python -m data_prep.tokenizer`)") from None
        raise FormatError(f"tokenizer folder {path} does not load with "
                            f"transformers.AutoTokenizer ({type(err).__name__}: {err})") from err
    if tok.eos_token_id is None:
        raise FormatError(f"tokenizer {path} has no EOS token: set `eos_token` in its "
                            f"tokenizer_config.json (documents are separated by EOS)")
    # Documents are tokenized whole and cut at load time: silence the "longer than max length" warning.
    tok.model_max_length = sys.maxsize
    return tok


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """One hash over a tokenizer folder's files, so a changed tokenizer is a different dataset."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
