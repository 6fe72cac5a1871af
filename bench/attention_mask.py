"""Step time of a decoder with data.document_mask against the plain causal mask, per sequence length.

Three ways to attend, each one forward + backward of a micro-batch of packed windows with an EOS every --doc-len
tokens on average; the minimum over --repeats steps of each, alternated so that a noisy machine affects all alike:
  causal  the plain causal mask: SDPA's causal fast path (flash on CUDA in bf16/fp16)
  dense   the document mask as a boolean (B, 1, T, T) tensor given to SDPA: no flash, every block computed
  flex    the document mask as FlexAttention's block mask, compiled: the masked blocks skipped (CUDA only: the
          CPU has no FlexAttention backward in torch 2.13)
The default shape is the tiny one (4 layers x 128, 4 heads); --d-model/--n-heads/--n-layers set another.

    python bench/attention_mask.py [--seq 512 2048 8192] [--batch 1] [--doc-len 256] [--threads 1]
        [--device cpu|cuda] [--dtype fp32|bf16] [--d-model 128 --n-heads 4 --n-layers 4] [--json]
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
from dist_train.model.document_mask import DocumentMask  # noqa: E402
from dist_train.tools.export import DTYPES  # noqa: E402
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


def document_masks(device: str) -> dict[str, DocumentMask | None]:
    """The ways to attend that run on `device`: None is the plain causal mask."""
    masks: dict[str, DocumentMask | None] = {"causal": None, "dense": DocumentMask(EOS, flex="never")}
    if device != "cpu":
        masks["flex"] = DocumentMask(EOS, flex="cuda")
    return masks


def measure(seq_len: int, args: argparse.Namespace) -> dict[str, float]:
    cfg = ModelConfig(seq_len=seq_len, attention="sdpa", d_model=args.d_model, n_heads=args.n_heads,
                      n_layers=args.n_layers, d_ff=4 * args.d_model)
    torch._dynamo.reset()  # each length compiles its own static flex kernel, as a training run would
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device, DTYPES[args.dtype]).train()
    ids = packed_batch(args.batch, seq_len, cfg.vocab_size, args.doc_len).to(args.device)
    masks = document_masks(args.device)
    times: dict[str, list[float]] = {name: [] for name in masks}
    for _ in range(args.repeats + 1):  # the first of each warms up (and compiles the flex kernel)
        for name, mask in masks.items():
            model.document_mask = mask
            times[name].append(step_ms(model, ids))
            model.zero_grad(set_to_none=True)
    row: dict[str, float] = {"seq_len": seq_len}
    for name, t in times.items():
        row[f"{name}_ms"] = min(t[1:])
    for name in times:
        if name != "causal":
            row[f"{name}_ratio"] = row[f"{name}_ms"] / row["causal_ms"]
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batch", type=int, default=1, help="windows per step")
    p.add_argument("--doc-len", type=int, default=256, help="mean document length in tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object: the settings and a row per length")
    return p


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seq_len in args.seq:
        r = measure(seq_len, args)
        rows.append(r)
        if not args.json:
            others = "  ".join(f"{name} {r[name + '_ms']:9.1f} ms x{r[name + '_ratio']:.2f}"
                              for name in ("dense", "flex") if name + "_ms" in r)
            print(f"seq {seq_len:>6}: causal {r['causal_ms']:9.1f} ms  {others}", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "seq")}
        device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        print(json.dumps({**settings, "device_name": device, "rows": rows}))


if __name__ == "__main__":
    main()
