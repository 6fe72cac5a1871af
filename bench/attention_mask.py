"""Step time of the tiny decoder with data.document_mask against the plain causal mask, per sequence length.

The masked model attends through SDPA with a boolean (B, 1, T, T) mask built from the window's document ids (the
CPU has no FlexAttention backward in torch 2.13), which cannot use the causal fast path; this measures what that
costs. Each step is one forward + backward of a micro-batch of packed windows with an EOS every --doc-len tokens
on average; the minimum over --repeats steps of each, alternating the two so a noisy machine affects both alike.

    python bench/attention_mask.py [--seq 512 2048 8192] [--batch 1] [--doc-len 256] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dist_train.config import ModelConfig  # noqa: E402
from dist_train.model import document_mask  # noqa: E402
from dist_train.model.decoder import Transformer  # noqa: E402

EOS = 0


def packed_batch(batch: int, seq_len: int, vocab: int, doc_len: int) -> torch.Tensor:
    """(batch, seq_len) random ids, each position an EOS with probability 1/doc_len."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq_len), generator=gen)
    ids[torch.rand(batch, seq_len, generator=gen) < 1 / doc_len] = EOS
    return ids


def step_ms(model: Transformer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, ids.roll(-1, dims=1)).backward()
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(seq_len: int, args: argparse.Namespace) -> dict[str, float]:
    cfg = ModelConfig(seq_len=seq_len, attention="sdpa")  # the tiny shape: 4 layers, d_model 128, 4 heads
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device).train()
    ids = packed_batch(args.batch, seq_len, cfg.vocab_size, args.doc_len).to(args.device)
    times: dict[str, list[float]] = {"causal": [], "masked": []}
    for _ in range(args.repeats + 1):  # the first of each warms up
        for name in times:
            document_mask.enable(model, EOS if name == "masked" else None)
            times[name].append(step_ms(model, ids))
    best = {name: min(t[1:]) for name, t in times.items()}
    return {"seq_len": seq_len, "causal_ms": best["causal"], "masked_ms": best["masked"],
            "ratio": best["masked"] / best["causal"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batch", type=int, default=1, help="windows per step")
    p.add_argument("--doc-len", type=int, default=256, help="mean document length in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per sequence length")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for seq_len in args.seq:
        r = measure(seq_len, args)
        print(json.dumps(r) if args.json else f"seq {seq_len:>6}: causal {r['causal_ms']:9.1f} ms  masked "
                                              f"{r['masked_ms']:9.1f} ms  x{r['ratio']:.2f}")


if __name__ == "__main__":
    main()
