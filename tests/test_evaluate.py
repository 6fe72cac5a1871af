"""`python -m dist_train.evaluate`: validation loss, perplexity and the unigram baseline, checked against a
computation of our own straight from the shard files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import REPO, cpu_env
from resume_helpers import STEPS, checkpoint, shared_run

from dist_train.checkpoint.weights import checkpoint_weights
from dist_train.model.build import build_model

pytestmark = pytest.mark.slow


def split_tokens(shard_dir, split: str) -> np.ndarray:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    return np.concatenate([np.fromfile(shard_dir / s["path"], dtype=manifest["dtype"])
                           for s in manifest["splits"][split]["shards"]]).astype(np.int64)


def test_evaluate_reports_the_validation_loss_perplexity_and_unigram_baseline(tmp_path_factory, shard_dir):
    run_dir = shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")
    # As users run it: without DS_ACCELERATOR, DeepSpeed detects the accelerator and logs the result.
    env = {k: v for k, v in cpu_env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-m", "dist_train.evaluate", "--run", str(run_dir), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the JSON alone (DeepSpeed logs go to stderr)
    model_row, unigram_row = result["rows"]
    print(result)

    # Every validation window once: tokens [i*T, i*T + T + 1) for i < (n - 1) // T.
    weights = checkpoint_weights(checkpoint(run_dir, STEPS))
    seq_len, vocab = weights.config.model.seq_len, weights.config.model.vocab_size
    val = split_tokens(shard_dir, "val")
    count = (len(val) - 1) // seq_len
    windows = torch.from_numpy(np.stack([val[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]))
    assert result["val_windows"] == count and result["val_tokens"] == count * seq_len
    model = weights.load_into(build_model(weights.config.model)).eval()
    with torch.no_grad():
        logits = torch.cat([model(windows[i:i + 64, :-1]) for i in range(0, count, 64)])
    expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="mean").item()
    assert model_row["step"] == STEPS
    assert model_row["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert model_row["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)

    counts = np.bincount(split_tokens(shard_dir, "train"), minlength=vocab)
    probs = (counts + 1) / (counts.sum() + vocab)
    unigram = -np.log(probs[windows[:, 1:].numpy()]).mean()
    assert unigram_row["name"] == "unigram (train split)"
    assert unigram_row["val_loss"] == pytest.approx(unigram, abs=1e-9)
    print(f"val loss {expected:.4f} (ppl {math.exp(expected):.1f}) vs unigram {unigram:.4f} over {count} windows")
