"""Mixture-of-Experts through DeepSpeed's MoE layer, trained for real (torchrun, gloo): expert parallelism computes
what one process computes, capacity drops are counted, the router losses shape the expert load, and the result
exports as a Mixtral that transformers runs with our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO
from resume_helpers import checkpoint, command, run, tail
from transformers import AutoModelForCausalLM

from dist_train.checkpoint.weights import checkpoint_weights
from dist_train.model.build import build_model
from dist_train.model.count import count_params
from dist_train.monitor import wandb_reader
from dist_train.monitor.jsonl import read_metrics
from dist_train.tools.export import export

MOE_TINY = REPO / "configs" / "moe-tiny.yaml"
STEPS = 20


def moe_overrides(shard_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """moe-tiny with 2 layers (4 experts, top-2, dropless), fp32, global batch 32 at any world size, a log line
    every step, one checkpoint at the end, all experts on each process unless `extra` says otherwise."""
    return [f"data.path={shard_dir}", f"run.out_dir={out_dir}", "model.n_layers=2", "precision=fp32",
            "train.micro_batch_size=8", "train.global_batch_size=32", f"train.max_steps={STEPS}",
            "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=5", "train.log_every=1",
            "train.eval_every=0", f"checkpoint.every={STEPS}", "checkpoint.keep_last=1", "parallel.expert=1", *extra]


def moe_command(overrides: list[str], nproc: int) -> list[str]:
    cmd = command(overrides, nproc, launcher="torchrun" if nproc > 1 else "python")
    return [str(MOE_TINY) if arg.endswith("tiny.yaml") else arg for arg in cmd]


def train(shard_dir: Path, run_dir: Path, nproc: int, *extra: str) -> list[dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    rc = run(moe_command(moe_overrides(shard_dir, run_dir, *extra), nproc), log)
    assert rc == 0, tail(log)
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def expert_parallel_run(tmp_path_factory, shard_dir) -> tuple[Path, list[dict]]:
    """2 processes, the experts split over them (parallel.expert=2), W&B offline."""
    run_dir = tmp_path_factory.mktemp("moe") / "ep2"
    return run_dir, train(shard_dir, run_dir, 2, "parallel.expert=2", "wandb.enabled=true", "wandb.mode=offline")


pytestmark = pytest.mark.slow  # real trainings


def test_expert_parallel_on_2_processes_trains_the_losses_of_all_experts_on_1(expert_parallel_run, shard_dir,
                                                                              tmp_path):
    """Dropless, fp32, the same global batch: each expert starts from the weights its global id draws, whichever
    rank holds it, and the all-to-all routes each token to the experts one process would."""
    _, ep2 = expert_parallel_run
    ep1 = train(shard_dir, tmp_path / "ep1", 1)
    assert [r["step"] for r in ep2] == [r["step"] for r in ep1] == list(range(1, STEPS + 1))
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(ep2, ep1)]
    print(f"losses EP=2: {[round(r['loss'], 5) for r in ep2]}\ngaps to EP=1: {[f'{g:.1e}' for g in gaps]}")
    assert ep2[-1]["loss"] < ep2[0]["loss"] - 1.0, "the model learns"
    assert max(gaps) < 1e-4
    assert all(r["moe_dropped_tokens"] == 0 for r in ep1 + ep2), "dropless routing drops nothing"


def test_router_losses_and_expert_load_are_logged_to_metrics_jsonl_and_wandb(expert_parallel_run):
    run_dir, records = expert_parallel_run
    keys = ("moe_aux_loss", "moe_z_loss", "moe_load_min", "moe_load_max", "moe_dropped_tokens")
    for r in records:
        assert set(keys) <= set(r), r
        # Balanced load gives aux 1 (DeepSpeed's l_aux) and shares of 1/4; z = logsumexp(logits)^2 > 0.
        assert 0.9 < r["moe_aux_loss"] < 4 and r["moe_z_loss"] > 0
        assert 0 <= r["moe_load_min"] <= 0.25 <= r["moe_load_max"] <= 1
    history = wandb_reader.read_history(run_dir)
    last = records[-1]
    row = {r["_step"]: r for r in history}[last["step"]]
    for key in keys:
        assert row[key] == pytest.approx(last[key]), key


def test_a_capacity_limited_run_drops_tokens_and_logs_how_many(shard_dir, tmp_path):
    """capacity_factor 0.5: each expert takes at most half its even share of a micro-batch's token slots."""
    records = train(shard_dir, tmp_path / "capped", 1, "model.moe.capacity_factor=0.5", "train.max_steps=3",
                    "checkpoint.every=0")
    dropped = [r["moe_dropped_tokens"] for r in records]
    # Per micro-batch and MoE layer: 1024 tokens x top-2 = 2048 slots, capacity ceil(1024 / 4 x 0.5 x 2) = 256 per
    # expert, so 4 x 256 = 1024 kept at most; 4 micro-batches and 2 MoE layers per step.
    print(f"token slots dropped per step: {dropped} (at least {2 * 4 * 1024})")
    assert all(d >= 2 * 4 * 1024 for d in dropped), dropped


def test_without_the_load_balancing_loss_the_expert_load_ends_more_imbalanced(shard_dir, tmp_path):
    extra = ("train.max_steps=40", "checkpoint.every=0", "train.lr=3e-3", "model.moe.z_loss_coef=0")
    balanced = train(shard_dir, tmp_path / "balanced", 1, *extra)
    unbalanced = train(shard_dir, tmp_path / "unbalanced", 1, *extra, "model.moe.aux_loss_coef=0")

    def spread(records: list[dict]) -> float:  # largest minus smallest expert share, over the last 10 steps
        return sum(r["moe_load_max"] - r["moe_load_min"] for r in records[-10:]) / 10

    print(f"load spread: aux_loss_coef 0.01 {spread(balanced):.4f}, 0 {spread(unbalanced):.4f}; "
          f"aux loss {balanced[-1]['moe_aux_loss']:.4f} vs {unbalanced[-1]['moe_aux_loss']:.4f}")
    assert spread(unbalanced) > 1.5 * spread(balanced)
    assert unbalanced[-1]["moe_aux_loss"] > balanced[-1]["moe_aux_loss"]


def test_the_expert_parallel_checkpoint_exports_as_a_mixtral_with_our_logits(expert_parallel_run, shard_dir,
                                                                            tokenizer_dir, tmp_path):
    run_dir, _ = expert_parallel_run
    weights = checkpoint_weights(checkpoint(run_dir, STEPS))
    assert any("deepspeed_experts.3." in name for name in weights.names), "all 4 experts, from both ranks' files"
    ours = weights.load_into(build_model(weights.config.model)).eval()
    out = export(weights, tmp_path / "hf", tokenizer_dir)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert hf.num_parameters() == count_params(weights.config.model).total
    from dist_train.data.loader import TokenLoader

    batch = TokenLoader([(str(shard_dir), 1.0)], "val", 128, 4, 0, 1, 0).next_batch()[0]
    with torch.no_grad():
        gap = (ours(batch) - hf(batch).logits).abs().max().item()
    print(f"max |logit gap| ours vs MixtralForCausalLM: {gap:.2e}")
    assert gap < 1e-5
    prompt = batch[:1, :16]
    generated = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt),
                            pad_token_id=0)
    with torch.no_grad():
        first = ours(prompt)[0, -1].argmax().item()
    assert generated.shape[1] > 16 and generated[0, 16].item() == first


def test_average_evaluate_and_export_read_the_expert_files_and_refuse_a_corrupt_one(expert_parallel_run, tmp_path):
    import shutil
    import subprocess
    import sys

    from distributed_helpers import cpu_env

    run_dir, _ = expert_parallel_run

    def tool(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                              timeout=300)

    averaged = tool("dist_train.average", "--run", str(run_dir), "--last", "1", "--out", str(tmp_path / "avg"))
    assert averaged.returncode == 0, averaged.stderr
    evaluated = tool("dist_train.evaluate", "--run", str(run_dir), "--weights", str(tmp_path / "avg"),
                     "--max-samples", "8", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    rows = json.loads(evaluated.stdout.strip().splitlines()[-1])["rows"]
    print(rows)
    assert rows[0]["step"] == STEPS and rows[0]["val_loss"] < 7.0, "the trained checkpoint, experts included"
    assert rows[1]["val_loss"] == pytest.approx(rows[0]["val_loss"], abs=1e-6), "an average of one is the checkpoint"

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb"))
    expert_file = checkpoint(copy, STEPS) / "layer_1_expert_2_mp_rank_00_model_states.pt"
    data = bytearray(expert_file.read_bytes())
    data[-200] ^= 0xFF
    expert_file.write_bytes(bytes(data))
    for argv in (("dist_train.export", "--run", str(copy), "--out", str(tmp_path / "hf")),
                 ("dist_train.evaluate", "--run", str(copy), "--max-samples", "8"),
                 ("dist_train.average", "--run", str(copy), "--last", "1", "--out", str(tmp_path / "avg2"))):
        refused = tool(*argv)
        assert refused.returncode == 2, (argv, refused.stderr[-2000:])
        assert expert_file.name in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "avg2").exists()
