"""Data prep at corpus scale: shard tokens/s against the bare Rust tokenizer, streaming memory, N tasks, loader.

    python bench/data_prep.py --work /tmp/dp_bench [--rounds 3] [--memory-scales 1 10 [100]] [--skip-speed]

Corpus: the Python standard library's sources (`sysconfig.get_paths()["stdlib"]`, *.py outside site-packages),
one JSON line per file (~31 MB), and a 4,096-token byte-level BPE trained on it (`data_prep.tokenizer`).
Every figure is a whole process, imports and reading included, on the same texts:
- speed: `data_prep.shard --num-proc N` (a fresh `datasets` cache each run; and `--streaming`) against a bare
  script that reads the JSONL and calls `tokenizers.Tokenizer.encode_batch` with N threads; rounds alternate
  the rows; the table gives medians and the ratio;
- memory: peak RSS (`/usr/bin/time`) of `--streaming --num-proc 1` on the first 10 % of the corpus (1×), the
  corpus (10×) and, with `--memory-scales 1 10 100`, ten copies (100×), as one JSONL file, many small JSONL
  files (one per source file), parquet and .txt (one line per document), and the growth of each step. The
  two steps differ: 1× → 10× also brings longer documents (the longest grows from 229 K to 756 K characters)
  and a file larger than Arrow's read-ahead, 10× → 100× only more of the same documents;
- tasks: the corpus as 2 tasks run at once (`--num-tasks 2`, one process each) + `data_prep.merge`;
- loader: `dist_train.data.TokenLoader` samples/s on the result, at `configs/tiny.yaml`'s seq_len and micro batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BARE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
n = 0
for i in range(0, len(texts), 256):
    n += sum(len(e.ids) + 1 for e in tok.encode_batch(texts[i:i + 256], add_special_tokens=False))
print(n)
"""


def env(work: Path, threads: int | None = None) -> dict[str, str]:
    extra = {} if threads is None else {"RAYON_NUM_THREADS": str(threads)}
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(work / "hf_cache"), **extra}


def timed(cmd: list[str], work: Path, threads: int | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB, the largest process) and stdout of a whole process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], env=env(work, threads), capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]), proc.stdout


def build_corpus(work: Path) -> tuple[Path, list[dict]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/"):
            continue
        try:
            docs.append({"text": path.read_text(encoding="utf-8"), "path": rel})
        except (UnicodeDecodeError, OSError):
            continue
    corpus = work / "stdlib.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return corpus, docs


def shard_cmd(inputs: list[Path], tok: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_prep.shard", "--input", *map(str, inputs), "--tokenizer", str(tok),
            "--out", str(out), "--no-progress", "--json", *extra]


def speed(work: Path, corpus: Path, tok: Path, rounds: int) -> list[dict]:
    rows: dict[str, list[float]] = {}
    tokens = 0
    for _ in range(rounds):
        for n in (1, 2):
            for name, cmd, threads in (
                    (f"bare encode_batch, {n} thread(s)", [sys.executable, "-c", BARE, str(tok), str(corpus)], n),
                    (f"data_prep.shard --num-proc {n}",
                     shard_cmd([corpus], tok, work / "out", "--num-proc", str(n)), None),
                    (f"data_prep.shard --num-proc {n} --streaming",
                     shard_cmd([corpus], tok, work / "out", "--num-proc", str(n), "--streaming"), None)):
                shutil.rmtree(work / "out", ignore_errors=True)
                shutil.rmtree(work / "hf_cache", ignore_errors=True)
                wall, _, stdout = timed(cmd, work, threads)
                if name.startswith("bare"):
                    tokens = int(stdout.strip())
                else:
                    summary = json.loads(stdout)
                    assert summary["train_num_tokens"] + summary["val_num_tokens"] == tokens - EMPTY_DOCS[0]
                rows.setdefault(name, []).append(tokens / wall)
                print(f"  {name}: {tokens / wall:,.0f} tok/s", flush=True)
    out = []
    for n in (1, 2):
        bare = statistics.median(rows[f"bare encode_batch, {n} thread(s)"])
        for name, samples in rows.items():
            if name.endswith(f"{n} thread(s)") or f"--num-proc {n}" in name:
                out.append({"row": name, "tok_per_s": statistics.median(samples),
                            "vs_bare": statistics.median(samples) / bare, "samples": samples})
    return out


EMPTY_DOCS = [0]  # empty source files: the bare script counts an EOS for them, shard writes none


def corpus_variants(work: Path, docs: list[dict], scale: float) -> dict[str, list[Path]]:
    """The corpus at `scale` × 1/10 of it, as one JSONL, many JSONL files, parquet and .txt."""
    import datasets

    take = docs[:max(1, len(docs) // 10)] if scale == 1 else docs * int(scale // 10)
    folder = work / f"mem_{scale:g}x"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "many").mkdir(parents=True)
    (folder / "one.jsonl").write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in take))
    for k, d in enumerate(take):
        (folder / "many" / f"{k:06d}.jsonl").write_text(json.dumps({"text": d["text"]}) + "\n")
    # Row groups of 100 documents (~2 MB): a row group is what parquet readers decompress at once, so it bounds
    # the reader's memory (one row group for the whole file would grow with the corpus).
    datasets.Dataset.from_dict({"text": [d["text"] for d in take]}).to_parquet(str(folder / "all.parquet"),
                                                                                batch_size=100)
    (folder / "all.txt").write_text("".join(d["text"] if d["text"].endswith("\n") else d["text"] + "\n"
                                            for d in take))
    return {"one JSONL": [folder / "one.jsonl"], "many files": [folder / "many"],
            "parquet": [folder / "all.parquet"], ".txt": [folder / "all.txt"]}


def memory(work: Path, docs: list[dict], tok: Path, scales: list[float], kinds: list[str] | None) -> list[dict]:
    rss: dict[str, dict[float, int]] = {}
    for scale in scales:
        variants = corpus_variants(work, docs, scale)
        for kind, inputs in variants.items():
            if kinds and kind not in kinds:
                continue
            shutil.rmtree(work / "out", ignore_errors=True)
            mb = sum(p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir()) for p in inputs)
            _, peak, _ = timed(shard_cmd(inputs, tok, work / "out", "--streaming", "--num-proc", "1"), work)
            rss.setdefault(kind, {})[scale] = peak
            print(f"  {kind} {scale:g}x ({mb / 1e6:.0f} MB): peak RSS {peak / 1024:.0f} MiB", flush=True)
        shutil.rmtree(work / f"mem_{scale:g}x")
    return [{"input": kind, **{f"{s:g}x_MiB": v / 1024 for s, v in by_scale.items()},
             **{f"growth_{a:g}x_to_{b:g}x": by_scale[b] / by_scale[a] for a, b in zip(scales, scales[1:])}}
            for kind, by_scale in rss.items()]


def tasks(work: Path, corpus: Path, tok: Path) -> dict:
    out = work / "tasks_out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    procs = [subprocess.Popen(shard_cmd([corpus], tok, out, "--num-tasks", "2", "--task-id", str(i)),
                              env=env(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    assert all(p.wait() == 0 for p in procs)
    merge = subprocess.run([sys.executable, "-m", "data_prep.merge", str(out), "--json"], env=env(work),
                           capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    merged = json.loads(merge.stdout)
    return {"tasks": 2, "wall_s": wall, "tok_per_s": (merged["train_num_tokens"] + merged["val_num_tokens"]) / wall,
            "out": str(out)}


def loader(folder: str, seq_len: int = 128, micro: int = 8, batches: int = 2000) -> dict:
    sys.path.insert(0, str(REPO))
    from dist_train.data.loader import TokenLoader

    tl = TokenLoader([(folder, 1.0)], "train", seq_len, micro, rank=0, world_size=1, seed=0)
    start = time.perf_counter()
    for _ in range(batches):
        tl.next_batch()
    wall = time.perf_counter() - start
    return {"samples_per_s": batches * micro / wall, "tokens_per_s": batches * micro * seq_len / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (the corpus, tokenizer and outputs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-scales", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-kinds", nargs="+", help="only these inputs: 'one JSONL', 'many files', parquet, .txt")
    parser.add_argument("--skip-tasks", action="store_true", help="no N-task and loader rows")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, docs = build_corpus(work)
    EMPTY_DOCS[0] = sum(1 for d in docs if not d["text"])
    tok = work / "tok4096"
    if not tok.exists():
        subprocess.run([sys.executable, "-m", "data_prep.tokenizer", "--input", str(corpus), "--vocab-size", "4096",
                        "--out", str(tok), "--no-progress"], env=env(work), check=True)
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, {len(docs)} documents), tokenizer {tok}")
    results: dict = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    if not args.skip_speed:
        results["speed"] = speed(work, corpus, tok, args.rounds)
    if not args.skip_memory:
        results["memory"] = memory(work, docs, tok, args.memory_scales, args.memory_kinds)
    shutil.rmtree(work / "hf_cache", ignore_errors=True)
    if not args.skip_tasks:
        results["tasks"] = tasks(work, corpus, tok)
        results["loader"] = loader(results["tasks"]["out"])
    results["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
