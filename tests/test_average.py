"""Checkpoint averaging: K copies of one checkpoint average to it bit for bit, two checkpoints to their mean,
and the averaged weights evaluate (side by side with the last checkpoint) and export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from distributed_helpers import REPO, cpu_env
from resume_helpers import STEPS, checkpoint, shared_run

from dist_train.checkpoint.weights import checkpoint_weights, open_weights

pytestmark = pytest.mark.slow


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """2 processes, ZeRO-2, checkpoints at steps 2, 4 and 6 (the kill test's uninterrupted run)."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")


def test_averaging_k_copies_of_one_checkpoint_returns_it(reference, tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(checkpoint(reference, STEPS), checkpoint(run_dir, step))
    cli("dist_train.average", "--run", str(run_dir), "--last", "3", "--out", str(tmp_path / "avg"))
    averaged, original = open_weights(weights=tmp_path / "avg"), checkpoint_weights(checkpoint(reference, STEPS))
    assert sorted(averaged.names) == sorted(original.names)
    for name in original.names:
        assert torch.equal(averaged.get(name), original.get(name)), name


def test_averaging_two_checkpoints_returns_their_mean_which_evaluates_and_exports(reference, tmp_path):
    proc = cli("dist_train.average", "--run", str(reference), "--last", "2", "--out", str(tmp_path / "avg"), "--json")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["averaged_steps"] == [STEPS - 2, STEPS]
    averaged = open_weights(weights=tmp_path / "avg")
    a, b = checkpoint_weights(checkpoint(reference, STEPS - 2)), checkpoint_weights(checkpoint(reference, STEPS))
    for name in a.unique_names:
        mean = ((a.get(name).double() + b.get(name).double()) / 2).float()
        assert torch.equal(averaged.get(name), mean), name
    assert not torch.equal(averaged.get("tok_emb.weight"), b.get("tok_emb.weight"))

    table = cli("dist_train.evaluate", "--run", str(reference), "--weights", str(tmp_path / "avg"),
                "--max-samples", "64").stdout
    print(table)
    lines = table.strip().splitlines()
    assert lines[0].split() == ["weights", "step", "val_loss", "val_ppl"]
    assert lines[1].startswith(str(checkpoint(reference, STEPS))) and lines[1].split()[1] == str(STEPS)
    assert lines[2].startswith(f"{tmp_path / 'avg'} (average of steps [{STEPS - 2}, {STEPS}])")
    assert lines[3].startswith("unigram (train split)")
    losses = [float(line.split()[-2]) for line in lines[1:4]]
    assert losses[0] != losses[1]

    cli("dist_train.export", "--weights", str(tmp_path / "avg"), "--out", str(tmp_path / "hf"))
    from transformers import AutoModelForCausalLM

    from dist_train.model.build import build_model

    ours = averaged.load_into(build_model(averaged.config.model)).eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    batch = torch.randint(0, averaged.config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(batch) - hf(batch).logits).abs().max().item() < 1e-5
