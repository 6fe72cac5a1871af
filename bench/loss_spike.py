"""A real loss spike, with and without the automatic rollback (train.max_rollbacks), plotted.

The spike: a copy of the shard folder in which the global samples of two training steps (26 and 27: samples
[200, 216) at a global batch of 8) are overwritten with uniformly random tokens. The loader maps global samples
to token windows deterministically, so exactly those steps read garbage. Their loss is at least ln(vocab) = 7.6
nats, well above the run's ~6 at that point.

Two runs of the tiny model (2 layers, fp32, 2 processes, ZeRO 1, a checkpoint every 5 steps) on that copy:
  rollback:    train.max_rollbacks=1, spike_window=10, spike_margin=1.0, spike_steps=2: the spike is confirmed at
               step 27, the run goes back to step 25's checkpoint and skips the samples read since (exactly the
               garbage), then trains on to step 36;
  no rollback: the same with train.max_rollbacks=0: it trains on the garbage.
Writes docs/loss_spike_rollback.png and prints the rollback event.

    python bench/loss_spike.py [--data SHARD_DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dist_train.checkpoint.verify import sha256_of  # noqa: E402
from dist_train.data.loader import TokenLoader  # noqa: E402
from dist_train.formats.manifest import read_manifest, write_json_atomic  # noqa: E402
from dist_train.monitor.jsonl import read_metrics  # noqa: E402
from bench.demo_data import DEMO_SHARDS  # noqa: E402
from bench.loss_figure import loss_figure  # noqa: E402

SEQ_LEN = 128
GLOBAL_BATCH = 8
SEED = 1234  # configs/tiny.yaml's train.seed: it fixes the sample order
MAX_STEPS = 36
SPIKE_STEPS = (26, 27)
GARBAGE = range((SPIKE_STEPS[0] - 1) * GLOBAL_BATCH, SPIKE_STEPS[-1] * GLOBAL_BATCH)
"""Global samples read by the spike steps: step s reads [(s - 1) * G, s * G)."""


def overrides(data: Path, out_dir: Path, rollback: bool) -> list[str]:
    return [f"data.path={data}", f"run.out_dir={out_dir}", "model.n_layers=2", "precision=fp32",
            "train.micro_batch_size=4", f"train.global_batch_size={GLOBAL_BATCH}", f"train.max_steps={MAX_STEPS}",
            "train.log_every=1", f"train.eval_every={MAX_STEPS}", "checkpoint.every=5", "checkpoint.keep_last=2",
            f"train.max_rollbacks={int(rollback)}", "train.spike_window=10", "train.spike_margin=1.0",
            "train.spike_steps=2"]


def garbage_copy(src: Path, dst: Path, samples: range, seed: int = 0) -> list[tuple[str, int]]:
    """Copy the shard folder `src` to `dst`, with the training windows of global `samples` (as the loader
    orders them) overwritten by random tokens, and the manifest's sha256 updated. Only the tokens inside each
    window are replaced (its first and last are kept), so neighbouring windows, which share an edge token, are
    untouched. Returns the (shard, token offset) of each window."""
    shutil.copytree(src, dst)
    loader = TokenLoader([(str(dst), 1.0)], "train", SEQ_LEN, 1, 0, 1, SEED)
    stream = loader.streams[0]
    rng = np.random.default_rng(seed)
    where = []
    for g in samples:
        _, i = loader.sample_index(g)
        start = i * SEQ_LEN + 1
        shard = int(np.searchsorted(stream.starts, start, side="right")) - 1
        offset = start - stream.starts[shard]
        tokens = np.memmap(stream.paths[shard], dtype=stream.dtype, mode="r+")
        end = min(offset + SEQ_LEN - 1, len(tokens))  # a window across a shard edge keeps its tail: still garbage
        tokens[offset:end] = rng.integers(0, loader.vocab_size, end - offset, dtype=stream.dtype)
        tokens.flush()
        where.append((stream.paths[shard].name, int(offset)))
    manifest = read_manifest(dst)
    for shard in manifest["splits"]["train"]["shards"]:
        shard["sha256"] = sha256_of(dst / shard["path"])
    write_json_atomic(dst / "manifest.json", manifest)
    return where


def train(data: Path, out_dir: Path, rollback: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29700 + int(rollback)}", str(REPO / "launch" / "train.py"), "--config",
           str(REPO / "configs" / "tiny.yaml"), *overrides(data, out_dir, rollback)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def plot(with_rollback: Path, without: Path, out: Path) -> None:
    title = "Random tokens in the data at steps 26-27: tiny model, 2 CPU processes, ZeRO 1"
    with loss_figure(out, title) as ax:
        for run_dir, label, colour in ((without, "no rollback (train.max_rollbacks=0)", "tab:red"),
                                       (with_rollback, "rollback (train.max_rollbacks=1)", "tab:blue")):
            records = read_metrics(run_dir)
            steps = [r["step"] for r in records if "loss" in r]
            val = [r["val_loss"] for r in records if "val_loss" in r][-1]
            ax.plot(steps, [r["loss"] for r in records if "loss" in r], color=colour, lw=1.6,
                    label=f"{label}: final val_loss {val:.3f}")
        for event in (r for r in read_metrics(with_rollback) if r.get("event") == "loss_spike"):
            first, last = event["spike_first_step"], event["spike_last_step"]
            ax.plot(range(first, last + 1), event["spike_losses"], "x", color="tab:blue", ms=9,
                    label=f"spike detected, undone: back to step {event['rolled_back_to_step']}")
            ax.axvspan(first - 0.5, last + 0.5, color="tab:blue", alpha=0.12,
                       label=f"{event['skipped_batches']} batches skipped (global samples "
                             f"{event['skipped_samples_from']}-{event['skipped_samples_to'] - 1}: the garbage)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEMO_SHARDS,
                        help="a shard folder (as `make demo` writes it); it is copied, not changed")
    parser.add_argument("--out", type=Path, help="folder for the two runs (default: a temporary one)")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "loss_spike_rollback.png")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="loss_spike_"))
    garbage_copy(args.data, out / "garbage_shards", GARBAGE)
    for rollback in (False, True):
        proc = train(out / "garbage_shards", out / f"rollback_{rollback}", rollback)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
    plot(out / "rollback_True", out / "rollback_False", args.png)
    for r in read_metrics(out / "rollback_True"):
        if "event" in r:
            print(json.dumps(r))
    for name in ("rollback_False", "rollback_True"):
        records = read_metrics(out / name)
        losses = {r["step"]: r["loss"] for r in records if "loss" in r}
        print(f"{name}: loss at steps 25-28 {[round(losses[s], 3) for s in range(25, 29)]}, "
              f"final {losses[MAX_STEPS]:.3f}, val_loss {[r['val_loss'] for r in records if 'val_loss' in r]}")
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
