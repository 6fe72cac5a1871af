"""Size a run before paying for it: `python -m dist_train.scaling {count,plan,memory,fit}`.

- count   exact parameter count and training FLOPs of a config (scaling_count)
- plan    compute-optimal N and D under the published laws, a model shape and a config (scaling_plan)
- memory  bytes per GPU for weights, gradients, optimizer states and activations (scaling_memory)
- fit     fit L(N, D) = E + A/N^α + B/D^β to your own runs (scaling_fit)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dist_train.config import Config, ConfigError, load_config
from dist_train.scaling_count import (
    PEAK_TFLOPS,
    ParamCount,
    count_params,
    flops_per_token,
    peak_flops,
    run_flops,
)

__all__ = [
    "PEAK_TFLOPS",
    "ParamCount",
    "count_params",
    "flops_per_token",
    "load_sizing_config",
    "main",
    "peak_flops",
    "run_flops",
]


def load_sizing_config(path: str | Path | None, overrides: list[str]) -> Config:
    """A config for sizing: like `load_config`, but a missing data section is fine (nothing is read)."""
    # Sizing needs no data; a placeholder only satisfies the trainer's check that a data source is named.
    # An explicit data.path / data.sources in the file or the overrides is kept and validated as usual.
    placeholder = ["data.path=<not needed for sizing>"]
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        if "data.path is missing" not in str(e):
            raise
        return load_config(path, [*overrides, *placeholder])


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


# ---------------------------------------------------------------------------------------------------------
# count

def count_report(cfg: Config, tokens: int | None) -> dict[str, Any]:
    m = cfg.model
    pc = count_params(m)
    per_token = flops_per_token(m)
    return {"total": pc.total, "embedding": pc.embedding, "non_embedding": pc.non_embedding,
            "flops_params": pc.flops_params, "seq_len": m.seq_len, "flops_per_token": per_token,
            "tokens": tokens, "run_flops": per_token * tokens if tokens else None}


def _count_text(r: dict[str, Any]) -> str:
    lines = [f"parameters      {r['total']:>18,}  ({_fmt_count(r['total'])})",
             f"  embedding     {r['embedding']:>18,}",
             f"  non-embedding {r['non_embedding']:>18,}",
             (f"FLOPs per token {r['flops_per_token']:>18,}  (6·{r['flops_params']:,} + attention at "
             f"seq_len {r['seq_len']})")]
    if r["tokens"]:
        lines.append(f"run FLOPs       {r['run_flops']:>18.3e}  ({_fmt_count(r['tokens'])} tokens)")
    return "\n".join(lines)


def cmd_count(args: argparse.Namespace) -> None:
    cfg = load_sizing_config(args.config, args.set)
    r = count_report(cfg, args.tokens)
    _emit(r, args.json, _count_text(r))


# ---------------------------------------------------------------------------------------------------------
# CLI

def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML config (a preset from configs/ or your own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set model.n_layers=24")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dist_train.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("count", help="exact parameter count and training FLOPs of a config")
    _add_config_args(p)
    p.add_argument("--tokens", type=float, help="training tokens of the run: also print the run's FLOPs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_count)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tokens", None) is not None:
        args.tokens = int(args.tokens)
    try:
        args.func(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
