"""Train a model: `deepspeed launch/train.py --config configs/tiny.yaml [key=value ...]`.

Also runs under `torchrun --nproc_per_node N launch/train.py ...`, `srun` and plain `python launch/train.py`.
Exit codes: 0 done, 2 bad config (refused before any process group starts), a `--resume PATH` checkpoint that fails
verification (the message names the file), a checkpoint refused because a file of it could run code when read
(before any rank reads one; `--trust-checkpoint` loads it) or a run folder that another training run holds (its
lock names the host, PID and start time; nothing in the folder is written), 3 stopped after train.max_bad_steps
non-finite losses in a row (the last good checkpoint is intact), 74 a checkpoint save found the disk full, the
quota exceeded or the file-size limit reached (ENOSPC / EDQUOT / EFBIG: the partial checkpoint is removed, `latest`
still names the previous one, intact; free space and re-run the same command to resume), 75 stopped by SIGTERM or
SIGUSR1 after saving a checkpoint (requeue and re-run the same command to resume), 1 anything else.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_train.checkpoint.verify import CorruptCheckpoint  # noqa: E402
from dist_train.config import (  # noqa: E402
    ConfigError,
    add_override_arguments,
    load_config,
    overrides_from,
    parse_args_with_overrides,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default="latest",
                        help="latest (default: resume if the run folder has a checkpoint), none, "
                             "or a checkpoint folder")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="resume from checkpoint files that need globals outside the safe allowlist (they may "
                             "run code when read): only for a checkpoint whose source you trust "
                             "(same as checkpoint.trust=true)")
    parser.add_argument("--resume-weights-only", action="store_true",
                        help="where the checkpoint's optimizer state cannot be loaded by this run (an MoE checkpoint "
                             "of another parallel.expert, or on another world size at parallel.expert > 1): load "
                             "its weights, step, data position and lr schedule and start the optimizer state fresh "
                             "(same as checkpoint.resume_weights_only=true)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_override_arguments(parser)
    args = parse_args_with_overrides(parser, argv)
    try:
        flags = [key for key, on in (("checkpoint.trust=true", args.trust_checkpoint),
                                     ("checkpoint.resume_weights_only=true", args.resume_weights_only)) if on]
        cfg = load_config(args.config, overrides_from(args) + flags)
        from dist_train import distributed
        from dist_train.checkpoint.safe_load import UnsafeCheckpointError
        from dist_train.train.run_lock import RunFolderLocked
        from dist_train.train.trainer import train

        try:
            return train(cfg, resume=args.resume)
        except UnsafeCheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            if e.every_rank:  # else the launcher stops the ranks that did not refuse
                distributed.shutdown()
            return 2
        except RunFolderLocked as e:  # raised on every rank together
            if e.report:
                print(f"error: {e}", file=sys.stderr)
            distributed.shutdown()
            return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CorruptCheckpoint as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
