"""Validation loss and perplexity of a checkpoint and/or a weights folder, next to a unigram baseline.

    python -m dist_train.evaluate --run RUN [--step N] [--weights DIR] [--max-samples M] [--json]

Rows: the run's latest checkpoint (or --step N), then each --weights folder (e.g. averaged weights from
`dist_train.average`), then the unigram model of the training split, all on the same validation windows, so the
numbers compare side by side. With only --weights, the data of that folder's config is used.

Validation windows are the loader's (`dist_train.data`): seq_len + 1 tokens cut from each source's val split,
in the loader's seeded order, the first --max-samples of them (default all); the loss is the mean next-token
cross-entropy in nats over all their positions, the perplexity exp(loss). A run trained with data.document_mask
is evaluated with the same mask: each token sees only its own document, at positions from 0. The unigram baseline
predicts every token with its frequency in the training split (add-one smoothed over the model's vocabulary,
counted over the first --unigram-tokens tokens of each source and mixed by the sources' weights): a model whose
loss is not well below it has learned nothing about context.

Encoder-decoders (model.arch=encoder_decoder) are evaluated on the same span corruption as in training
(`dist_train.data.span_corruption`, the val split's examples), the loss over the labels. Their unigram baseline
is the unigram model of the targets: of the Ld label positions of an example, one is each of the `spans`
sentinels, one is EOS and `noise` are masked corpus tokens, so it predicts sentinel k and EOS with 1/Ld each on
top of (noise/Ld) x the training split's token frequencies.

With --tasks, the weights are evaluated on tasks of EleutherAI's lm-evaluation-harness instead (see
`dist_train.tools.task_cli`): `--tasks shakespeare_next_line,shakespeare_ppl --include-path configs/eval` are the
two offline tasks shipped here; hellaswag, arc_easy, lambada_openai, ... are lm-eval's own (their datasets come
from the Hugging Face hub).

The checkpoint is checked against its files.json before it is read (`--no-verify-hashes`: sizes only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_train.checkpoint.safe_load import UnsafeCheckpointError, add_trust_argument
from dist_train.checkpoint.verify import CorruptCheckpoint, add_verify_argument
from dist_train.checkpoint.weights import Weights, open_weights
from dist_train.config import Config
from dist_train.data.build import build_loader
from dist_train.data.loader import TokenLoader
from dist_train.data.span_corruption import span_lengths
from dist_train.distributed.process_group import deepspeed_logs_to_stderr
from dist_train.formats.errors import FormatError
from dist_train.formats.manifest import read_manifest
from dist_train.model import document_mask
from dist_train.model.build import build_model, model_vocab_size
from dist_train.tools.task_cli import add_task_arguments, evaluate_tasks


@dataclass
class ValData:
    columns: tuple[torch.Tensor, ...]
    """The model's inputs, labels last: (inputs, targets) (N, seq_len) each, or for an encoder-decoder (encoder
    input (N, Le), decoder input (N, Ld), labels (N, Ld))."""
    eos_token_id: int
    """The EOS that ends each document (the first source's manifest): a data.document_mask run's mask splits there."""

    @property
    def targets(self) -> torch.Tensor:
        return self.columns[-1]


def _source_examples(cfg: Config, path: str, max_samples: int | None) -> list[tuple[np.ndarray, ...]]:
    if cfg.model.arch == "decoder":
        loader = TokenLoader([(path, 1.0)], "val", cfg.model.seq_len, 1, 0, 1, cfg.train.seed)
        count = loader.num_samples[0] if max_samples is None else min(max_samples, loader.num_samples[0])
        return [(w[:-1], w[1:]) for w in (loader.window(g) for g in range(count))]
    single = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path, sources=None))
    corrupted = build_loader(single, "val", 0, 1, model_vocab_size(cfg)[0], micro_batch_size=1)
    available = corrupted.windows.num_samples[0]
    count = available if max_samples is None else min(max_samples, available)
    return [corrupted.example(g) for g in range(count)]


def val_windows(cfg: Config, max_samples: int | None) -> ValData:
    """Every source's validation windows (up to max_samples each), in the loader's order."""
    paths = [path for path, _ in cfg.data.weighted_paths()]
    examples = [e for path in paths for e in _source_examples(cfg, path, max_samples)]
    return ValData(columns=tuple(torch.from_numpy(np.stack(column)) for column in zip(*examples)),
                   eos_token_id=read_manifest(paths[0])["eos_token_id"])


@torch.no_grad()
def model_loss(weights: Weights, data: ValData, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy (nats per token) of the weights on the windows, each document masked apart as in
    training when the weights' run had data.document_mask."""
    model = weights.load_into(build_model(weights.config.model)).to(device).eval()
    document_mask.enable(model, data.eos_token_id if weights.config.data.document_mask else None)
    total, count = 0.0, len(data.targets)
    for start in range(0, count, batch_size):
        batch = [column[start:start + batch_size].to(device) for column in data.columns]
        total += model(*batch).double().item() * len(batch[0])  # every example has as many targets: a mean each
    return total / count


def unigram_probs(cfg: Config, max_tokens: int) -> np.ndarray:
    """Add-one smoothed token frequencies of the training split, mixed over sources by weight."""
    vocab = cfg.model.vocab_size
    probs = np.zeros(vocab)
    sources = cfg.data.weighted_paths()
    total_weight = sum(w for _, w in sources)
    for path, weight in sources:
        loader = TokenLoader([(path, 1.0)], "train", cfg.model.seq_len, 1, 0, 1, cfg.train.seed)
        stream = loader.streams[0]
        counts = np.zeros(vocab, dtype=np.int64)
        chunk = 1 << 24
        for start in range(0, min(stream.num_tokens, max_tokens), chunk):
            length = min(chunk, min(stream.num_tokens, max_tokens) - start)
            counts += np.bincount(stream.read(start, length), minlength=vocab)[:vocab]
        probs += weight / total_weight * (counts + 1) / (counts.sum() + vocab)
    if cfg.model.arch == "encoder_decoder":
        probs = _targets_unigram(cfg, probs, TokenLoader([(sources[0][0], 1.0)], "train", 1, 1, 0, 1, 0).eos_token_id)
    return probs


def _targets_unigram(cfg: Config, corpus: np.ndarray, eos: int) -> np.ndarray:
    """The span-corruption targets' unigram model (module doc) from the corpus's token frequencies."""
    lengths = span_lengths(cfg.model.seq_len, cfg.data.noise_density, cfg.data.mean_noise_span_length)
    probs = corpus * lengths.noise / lengths.decoder
    probs[eos] += 1 / lengths.decoder
    probs[len(probs) - lengths.spans:] += 1 / lengths.decoder  # the sentinels, one of each per example
    return probs


def unigram_loss(probs: np.ndarray, data: ValData) -> float:
    return float(-np.log(probs[data.targets.numpy()]).mean())


def row(name: str, loss: float, step: int | None = None, **extra: object) -> dict[str, object]:
    return {"name": name, "step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)), **extra}


def format_table(rows: list[dict[str, object]], tokens: int) -> str:
    width = max(len(str(r["name"])) for r in rows)
    lines = [f"{'weights':<{width}}  {'step':>7}  {'val_loss':>9}  {'val_ppl':>10}"]
    for r in rows:
        step = "-" if r["step"] is None else str(r["step"])
        lines.append(f"{r['name']:<{width}}  {step:>7}  {r['val_loss']:>9.4f}  {r['val_ppl']:>10.2f}")
    lines.append(f"({tokens:,} validation tokens)")
    return "\n".join(lines)


def evaluate(sources: list[Weights], max_samples: int | None, batch_size: int, unigram_tokens: int,
             device: torch.device) -> dict[str, object]:
    """Rows for each weights source plus the unigram baseline, on the first source's validation data."""
    cfg = sources[0].config
    data = val_windows(cfg, max_samples)
    rows = []
    for w in sources:
        averaged = w.meta.get("averaged_steps")
        label = f"{w.source} (average of steps {averaged})" if averaged else w.source
        rows.append(row(label, model_loss(w, data, batch_size, device), w.meta.get("step")))
    label = "unigram (train split)" if cfg.model.arch == "decoder" else "unigram of the targets (train split)"
    rows.append(row(label, unigram_loss(unigram_probs(cfg, unigram_tokens), data)))
    return {"rows": rows, "val_tokens": data.targets.numel(), "val_windows": len(data.targets)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder: evaluate its latest checkpoint (or --step N)")
    parser.add_argument("--step", type=int, help="evaluate the checkpoint of this step")
    parser.add_argument("--weights", type=Path, action="append", default=[],
                        help="a weights folder (from dist_train.average); repeatable")
    parser.add_argument("--max-samples", type=int, help="validation windows per source (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows (or lm-eval requests) per forward pass")
    parser.add_argument("--unigram-tokens", type=int, default=100_000_000,
                        help="training tokens per source counted for the unigram baseline")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_task_arguments(parser)
    add_trust_argument(parser)
    add_verify_argument(parser)
    args = parser.parse_args(argv)
    if args.run is None and not args.weights:
        parser.error("give --run RUN and/or --weights DIR")
    if args.step is not None and args.run is None:
        parser.error("--step needs --run")
    for flag, value in (("--max-samples", args.max_samples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            print(f"evaluate: {flag} must be at least 1, not {value}", file=sys.stderr)
            return 2
    deepspeed_logs_to_stderr()
    try:
        sources = (([open_weights(args.run, args.step, trust=args.trust_checkpoint, verify=args.verify)]
                    if args.run else []) + [open_weights(weights=w) for w in args.weights])
    except (FileNotFoundError, ValueError, UnsafeCheckpointError, CorruptCheckpoint) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tasks:
        return evaluate_tasks(args, sources, device)
    try:
        result = evaluate(sources, args.max_samples, args.batch_size, args.unigram_tokens, device)
    except FormatError as e:  # the run's shards: a relative data.path is read from the current folder
        print(f"evaluate: {e}\n(the run's data.path is read relative to the current folder, {Path.cwd()}: run "
              f"this from the folder training started in)", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result["rows"], result["val_tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
