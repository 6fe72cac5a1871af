"""Two small offline lm-evaluation-harness tasks made from the bundled Shakespeare corpus (configs/eval/).

    python -m data_prep.eval_tasks --corpus data/shakespeare/shakespeare.jsonl --out configs/eval

Both come from the documents of the demo's validation split (`data_prep.shard --val-fraction 0.05`, seed 0:
the same hash decides), so a model trained by `make demo` has not seen them:

- `shakespeare_next_line.jsonl` (multiple choice, accuracy): four consecutive verse lines of a passage, then the
  true next line among four; the three others are lines of other held-out documents, of a length close to the
  true one (so length alone does not give it away). A model that knows nothing scores 0.25.
- `shakespeare_ppl.jsonl` (rolling log-likelihood: word and byte perplexity, bits per byte): the opening
  `PPL_CHARS` characters of held-out documents.

The result is the same on every machine (fixed seed; the corpus is ordered). The files are small and committed,
so tests and users need neither this script nor the network; it documents how they were made.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_prep.encode import in_val_split

VAL_FRACTION, SPLIT_SEED = 0.05, 0  # the demo's `data_prep.shard` arguments (Makefile)
CONTEXT_LINES, CHOICES = 4, 4
NEXT_LINE_ITEMS, PPL_DOCUMENTS, PPL_CHARS = 200, 40, 1500
MIN_LINE_CHARS = 24


def verse_lines(text: str) -> list[str]:
    """Lines that read as verse or prose: long enough, not a speaker's name or stage heading in capitals."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if len(line) >= MIN_LINE_CHARS and not line.isupper()]


def next_line_items(documents: list[str], rng: random.Random) -> list[dict]:
    pool = [(d, line) for d, text in enumerate(documents) for line in verse_lines(text)]
    candidates = [(d, lines, i) for d, text in enumerate(documents)
                  for lines in [verse_lines(text)] for i in range(CONTEXT_LINES, len(lines))]
    items = []
    for d, lines, i in rng.sample(candidates, min(NEXT_LINE_ITEMS, len(candidates))):
        true = lines[i]
        near = [line for other, line in pool if other != d and abs(len(line) - len(true)) <= 8 and line != true]
        distractors = rng.sample(near, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [true] + distractors[label:]
        items.append({"context": "\n".join(lines[i - CONTEXT_LINES:i]), "choices": choices, "label": label})
    return items


def held_out_documents(corpus: Path) -> list[str]:
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    return [t for t in texts if t and in_val_split(t, SPLIT_SEED, VAL_FRACTION)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.eval_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/shakespeare/shakespeare.jsonl"),
                        help="the JSONL of `python -m data_prep.corpora shakespeare`")
    parser.add_argument("--out", type=Path, default=Path("configs/eval"))
    args = parser.parse_args(argv)
    documents = held_out_documents(args.corpus)
    rng = random.Random(0)
    items = next_line_items(documents, rng)
    ppl = [{"text": t[:PPL_CHARS]} for t in documents[:PPL_DOCUMENTS]]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "shakespeare_next_line.jsonl", items)
    write_jsonl(args.out / "shakespeare_ppl.jsonl", ppl)
    print(f"{len(documents)} held-out documents: {len(items)} next-line items, {len(ppl)} perplexity texts "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
