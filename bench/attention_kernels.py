"""Forward + backward time of one attention layer: torch's SDPA against dist_train's matmul attention.

What `model.attention: auto` rests on: on the CPU, for bf16/fp16 up to MATMUL_ATTENTION_MAX_LEN tokens,
two batched matmuls with an fp32 softmax beat torch's CPU flash kernel (whose 16-bit backward is slow).
One thread, the tiny config's heads (4 query, 2 key/value heads of 32) unless told otherwise; the minimum
over --repeats timings of each, alternating kernels so a noisy machine affects both alike.

    python bench/attention_kernels.py [--batch 8] [--seq 64 128 192 256 512] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dist_train.model.blocks import MATMUL_ATTENTION_MAX_LEN, matmul_attention, sdpa_attention  # noqa: E402


def time_ms(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> float:  # noqa: ANN001
    start = time.perf_counter()
    kernel(q, k, v).backward(grad)
    if q.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seq", type=int, nargs="+", default=[64, 128, 192, 256, 512])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)
    kernels = {"sdpa": lambda q, k, v: sdpa_attention(q, k, v, 0.0),
               "matmul": lambda q, k, v: matmul_attention(q, k, v, 0.0)}
    print(f"one attention layer, forward + backward, batch {args.batch}, {args.heads}/{args.kv_heads} heads of "
          f"{args.head_dim}, {args.device}, 1 thread (auto picks matmul on the CPU for 16-bit up to "
          f"{MATMUL_ATTENTION_MAX_LEN} tokens)")
    print(f"{'dtype':<10}{'seq':>6}{'sdpa ms':>10}{'matmul ms':>11}{'sdpa/matmul':>13}")
    for dtype in (torch.bfloat16, torch.float32):
        for seq in args.seq:
            q, k, v = (torch.randn(args.batch, heads, seq, args.head_dim, dtype=dtype, device=args.device,
                                   requires_grad=True) for heads in (args.heads, args.kv_heads, args.kv_heads))
            grad = torch.randn_like(q)
            best = {name: float("inf") for name in kernels}
            for kernel in kernels.values():
                time_ms(kernel, q, k, v, grad)  # warm-up
            for _ in range(args.repeats):
                for name, kernel in kernels.items():
                    best[name] = min(best[name], time_ms(kernel, q, k, v, grad))
            print(f"{str(dtype).removeprefix('torch.'):<10}{seq:>6}{best['sdpa']:>10.2f}{best['matmul']:>11.2f}"
                  f"{best['sdpa'] / best['matmul']:>12.2f}x")


if __name__ == "__main__":
    main()
