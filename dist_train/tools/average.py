"""Average the weights of a run's last K checkpoints (checkpoint averaging: a cheap final gain).

    python -m dist_train.average --run RUN --last K --out DIR [--json]

Writes a weights folder (`model.safetensors` in our parameter names, `config.yaml`, `weights.json` with the
averaged steps) that `python -m dist_train.evaluate --weights DIR` evaluates and `python -m dist_train.export
--weights DIR` exports. The mean is accumulated in float64, one checkpoint at a time, and rounded to fp32 once,
so averaging K copies of one checkpoint returns it bit for bit. Memory: the float64 sums plus one
checkpoint's weights (about three fp32 copies of the model); Adam's moments are never loaded.

Every checkpoint is checked against its files.json before any is read (`--no-verify-hashes`: sizes only), and --out
is a new folder or one average wrote before (`dist_train.tools.output_folder`: anything else is refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dist_train.checkpoint.layout import CLIENT_STATE, read_client_state
from dist_train.checkpoint.safe_load import UnsafeCheckpointError, add_trust_argument
from dist_train.checkpoint.verify import CorruptCheckpoint, VerifyMode, add_verify_argument, refuse_if_corrupt
from dist_train.checkpoint.weights import checkpoint_weights, save_weights_folder
from dist_train.config import Config
from dist_train.distributed.process_group import deepspeed_logs_to_stderr
from dist_train.tools.output_folder import check_output_folder, output_folder

TOOL = "dist_train.average"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (those with client_state.json), oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / CLIENT_STATE).exists())


def average_checkpoints(paths: list[Path], trust: bool = False, verify: VerifyMode = "full"
                        ) -> tuple[dict[str, torch.Tensor], list[int], Config]:
    """Element-wise mean of the fp32 weights of `paths`; returns it, the averaged steps and the last config. Every
    checkpoint is verified (`verify`) before the first is read, so a corrupt one costs no averaging."""
    for path in paths:
        refuse_if_corrupt(path, verify)
    sums: dict[str, torch.Tensor] = {}
    steps: list[int] = []
    shape_hash = None
    for path in paths:
        weights = checkpoint_weights(path, trust, "sizes")  # hashed above; one checkpoint held at a time
        if shape_hash is None:
            shape_hash = weights.config.model_hash()
        elif weights.config.model_hash() != shape_hash:
            raise ValueError(f"{path} holds another model shape than {paths[0]}: cannot average them")
        for name in weights.unique_names:
            tensor = weights.get(name).double()
            sums[name] = sums[name].add_(tensor) if name in sums else tensor
        steps.append(weights.meta["step"])
    return {name: (total / len(paths)).float() for name, total in sums.items()}, steps, weights.config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_train.average", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder")
    parser.add_argument("--last", type=int, required=True, help="average the K most recent checkpoints")
    parser.add_argument("--out", type=Path, required=True,
                        help="output weights folder: a new one, or one average wrote before (replaced when complete)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_trust_argument(parser)
    add_verify_argument(parser)
    args = parser.parse_args(argv)
    available = complete_checkpoints(args.run)
    if args.last < 1 or args.last > len(available):
        print(f"average: --last must be between 1 and the {len(available)} complete checkpoints in "
              f"{args.run}/checkpoints ({', '.join(p.name for p in available) or 'none'}); raise "
              f"checkpoint.keep_last to keep more", file=sys.stderr)
        return 2
    paths = available[-args.last:]
    deepspeed_logs_to_stderr()
    try:
        check_output_folder(args.out, TOOL)  # before any checkpoint is read
        tensors, steps, cfg = average_checkpoints(paths, args.trust_checkpoint, args.verify)
        meta = {"averaged_steps": steps, "run": str(args.run.resolve()),
                "tokens": read_client_state(paths[-1])["train_state"]["tokens"]}
        with output_folder(args.out, TOOL) as tmp:
            save_weights_folder(tmp, tensors, cfg, meta)
    except (ValueError, UnsafeCheckpointError, CorruptCheckpoint) as e:
        print(f"average: {e}", file=sys.stderr)
        return 2
    result = {"out": str(args.out), **meta}
    print(json.dumps(result) if args.json else f"averaged steps {steps} of {args.run} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
