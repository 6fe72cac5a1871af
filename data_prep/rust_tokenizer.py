"""A tokenizer folder's Rust `tokenizers.Tokenizer`, loaded without importing `transformers`.

`data_prep.shard` encodes with the Rust tokenizer directly (`encode_batch_fast`): the `transformers` wrapper
costs a second or more of imports per process and builds Python lists and offsets that shards never use.
The folder is the one `transformers.AutoTokenizer` loads (`tokenizer.json` + `tokenizer_config.json`); the
tokenizer is set up to encode exactly as `AutoTokenizer(texts, add_special_tokens=False,
split_special_tokens=True)` does: no truncation, no padding, a literal special token inside a text split
into ordinary tokens. A folder without `tokenizer.json` (a slow-only tokenizer) is loaded through
`transformers` once, for its backend.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from dist_train.formats.errors import FormatError
from dist_train.formats.tokenizer_folder import load_tokenizer, tokenizer_folder


@dataclass(frozen=True)
class TokenizerFacts:
    """What the manifest needs to know about a tokenizer."""

    vocab_size: int  # tokens, added (special) tokens included: `len(AutoTokenizer.from_pretrained(DIR))`
    eos_token_id: int


def _eos_content(folder: Path) -> str | None:
    """The EOS token as `tokenizer_config.json` (or `special_tokens_map.json`) names it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def _from_transformers(folder: Path) -> tuple[Tokenizer, TokenizerFacts]:

    tok = load_tokenizer(folder)
    if not tok.is_fast:
        raise FormatError(f"tokenizer folder {folder} has no fast (Rust) tokenizer: save it with "
                          f"`AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR)`")
    return tok.backend_tokenizer, TokenizerFacts(len(tok), tok.eos_token_id)


def load_rust_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, TokenizerFacts]:
    """The folder's Rust tokenizer, set up as `data_prep.shard` encodes, and its vocabulary size and EOS id."""
    folder = tokenizer_folder(path)
    file = folder / "tokenizer.json"
    try:
        eos = _eos_content(folder)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"tokenizer folder {path} does not load: its config is not valid JSON ({err})") from err
    if not file.is_file() or eos is None:
        tok, facts = _from_transformers(folder)
    else:
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as err:
            raise FormatError(f"tokenizer folder {path} does not load ({type(err).__name__}: {err}); "
                              f"check {file}") from err
        eos_id = tok.token_to_id(eos)
        if eos_id is None:
            raise FormatError(f"tokenizer {path} has no EOS token: its eos_token {eos!r} is not in its "
                              f"vocabulary (documents are separated by EOS)")
        facts = TokenizerFacts(tok.get_vocab_size(with_added_tokens=True), eos_id)
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not EOS
    return tok, facts
