"""train.z_loss (PaLM's z-loss): the loss and log(Z)^2 from one logsumexp, and real training runs in which it is
logged apart from the cross-entropy and pulls log Z towards 0 against a run without it; with model.qk_norm, tensor-
and sequence-parallel runs that equal one process. (The q/k norms' export and count: test_export.py,
test_scaling.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from resume_helpers import checkpoint, command, overrides, run, tail

from dist_train.checkpoint.weights import checkpoint_weights
from dist_train.config import ModelConfig
from dist_train.data.loader import TokenLoader
from dist_train.model import z_loss
from dist_train.model.build import build_model
from dist_train.model.loss import IGNORE_INDEX, lm_and_z_loss, lm_loss
from dist_train.train.step import auxiliary_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_and_log_z_squared_from_one_logsumexp_equal_their_definitions(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 17, 50, generator=gen) * 4 + 2).to(dtype)  # log Z far from 0
    labels = torch.randint(0, 50, (3, 17), generator=gen)
    labels[0, :5] = IGNORE_INDEX
    loss, z = lm_and_z_loss(logits, labels)
    x = logits.float()
    kept = labels != IGNORE_INDEX
    expected_z = torch.logsumexp(x, -1)[kept].square().mean()
    expected_loss = F.cross_entropy(x.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    print(f"{dtype}: loss {loss.item():.6f} (F.cross_entropy {expected_loss.item():.6f}), log(Z)^2 {z.item():.4f}")
    assert loss.dtype == z.dtype == torch.float32
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert z.item() == pytest.approx(expected_z.item(), rel=1e-6) and z.item() > 10


def model_and_inputs(kind: str, tmp_path: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 16), generator=gen)
    if kind == "hf_config":
        from transformers import LlamaConfig

        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=200).save_pretrained(tmp_path)
        return build_model(ModelConfig(hf_config=str(tmp_path))), (ids,)
    cfg = ModelConfig(arch=kind, n_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=200, seq_len=16,
                      qk_norm=True, init_std=0.5)  # large weights: log Z far from log(200)
    return build_model(cfg), (ids, ids.flip(1)) if kind == "encoder_decoder" else (ids,)


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder", "hf_config"])
def test_every_model_returns_the_cross_entropy_and_leaves_the_weighted_z_loss_to_the_step(kind, tmp_path):
    model, inputs = model_and_inputs(kind, tmp_path)
    labels = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    z_loss.enable(model, 0.5)
    with torch.no_grad():
        logits = model.eval()(*inputs).float()
        assert model(*inputs, labels) == lm_loss(logits, labels), "evaluation: the cross-entropy alone"
    assert auxiliary_loss(model) is None and model.z_loss.take() == {}, "and no z-loss recorded"
    loss = model.train()(*inputs, labels)
    log_z_squared = torch.logsumexp(logits, -1).square().mean().item()
    extra = auxiliary_loss(model)
    print(f"{kind}: loss {loss.item():.4f}, log(Z)^2 {log_z_squared:.3f}, added {extra.item():.4f}")
    assert loss.item() == pytest.approx(lm_loss(logits, labels).item(), rel=1e-5)
    assert extra.requires_grad and extra.item() == pytest.approx(0.5 * log_z_squared, rel=1e-5)
    assert auxiliary_loss(model) is None, "added once, to the backward of its own forward"
    assert model.z_loss.take() == {"z_loss": pytest.approx(log_z_squared, rel=1e-5)}


# ---------------------------------------------------------------------------------------------------------------
# Real runs: the 2-layer tiny model, one process, 30 steps at lr 3e-3 (5 warmup steps), a metrics line every step.

Z_LOSS_STEPS = 30
RUN = ("train.max_steps=30", "train.warmup_steps=5", "checkpoint.every=30")


def metrics(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def step_values(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(run_dir) if key in r}


@torch.no_grad()
def mean_log_z_squared(run_dir: Path, shard_dir: Path) -> float:
    """Mean log(Z)^2 of the run's final weights over 4 validation sequences (the same for every run)."""
    weights = checkpoint_weights(checkpoint(run_dir, Z_LOSS_STEPS))
    model = weights.load_into(build_model(weights.config.model)).eval()
    ids, labels = TokenLoader([(str(shard_dir), 1.0)], "val", 128, 4, 0, 1, 0).next_batch()
    return lm_and_z_loss(model(ids), labels)[1].item()


@pytest.fixture(scope="module")
def with_and_without(tmp_path_factory, shard_dir) -> tuple[Path, Path]:
    dirs = []
    for name, coef in (("z_loss", 0.1), ("no_z_loss", 0.0)):
        run_dir = tmp_path_factory.mktemp(name)
        cmd = command(overrides(shard_dir, run_dir, *RUN, f"train.z_loss={coef}"), nproc=1, launcher="python")
        assert run(cmd, run_dir / "train.log") == 0, tail(run_dir / "train.log")
        dirs.append(run_dir)
    return dirs[0], dirs[1]


@pytest.mark.slow
def test_z_loss_is_logged_apart_and_pulls_log_z_towards_zero_against_a_run_without(with_and_without, shard_dir):
    with_z, without = with_and_without
    ours, theirs = metrics(with_z), metrics(without)
    logged = [r["z_loss"] for r in ours]
    print(f"logged z_loss (mean log(Z)^2 per window): {[round(z, 3) for z in logged]}")
    print(f"losses with z-loss {[round(r['loss'], 3) for r in ours]}, without {[round(r['loss'], 3) for r in theirs]}")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, Z_LOSS_STEPS + 1))
    assert all("z_loss" not in r for r in theirs), "off by default: nothing computed, nothing logged"
    # The logged loss is the cross-entropy alone: at step 1 (same weights, same batch) the run without's, where
    # 0.1 x log(Z)^2 would add over 5 nats; and it still falls.
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-5) and ours[-1]["loss"] < ours[0]["loss"] - 1
    assert logged[0] > 50 and logged[-1] < logged[0] / 2
    # The gradient changed: the final weights' log(Z)^2 on the same validation sequences, with and without.
    z_with, z_without = mean_log_z_squared(with_z, shard_dir), mean_log_z_squared(without, shard_dir)
    print(f"final mean log(Z)^2 on validation sequences: with z-loss {z_with:.3f}, without {z_without:.3f}")
    assert z_with < z_without / 2
    assert z_with == pytest.approx(logged[-1], rel=0.5), "the logged value measures what the model computes"
    assert "| z_loss " in (with_z / "train.log").read_text()


QK_Z = ("model.qk_norm=true", "train.z_loss=0.1", "train.warmup_steps=1", "train.max_steps=4", "checkpoint.every=4")
"""q/k norms and a large z-loss, 4 steps at full lr: a wrong gradient of either shows in the losses of steps 2-4."""


@pytest.mark.slow
def test_qk_norm_and_z_loss_under_tensor_and_sequence_parallelism_equal_one_process(shard_dir, tmp_path):
    runs = {}
    for name, nproc, layout in (("x1", 1, None), ("tp2", 2, "parallel.tensor=2"), ("sp2", 2, "parallel.sequence=2")):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        log = runs[name] / "train.log"
        cmd = command(overrides(shard_dir, runs[name], *QK_Z, *([layout] if layout else [])), nproc=nproc)
        assert run(cmd, log) == 0, tail(log)
    reference = {key: step_values(runs["x1"], key) for key in ("loss", "z_loss")}
    print(f"one process: {reference}")
    assert sorted(reference["z_loss"]) == [1, 2, 3, 4] and reference["z_loss"][4] < reference["z_loss"][1]
    for name in ("tp2", "sp2"):
        for key in ("loss", "z_loss"):  # SP: each rank's share of the sequences' z-loss, summed by DeepSpeed
            assert step_values(runs[name], key) == pytest.approx(reference[key], rel=1e-4), (name, key)
    # Each TP rank norms its own heads: the norms' gradients are summed over the group, so the ranks keep equal
    # norms, those of one process.
    single = checkpoint_weights(checkpoint(runs["x1"], 4))
    shards = [torch.load(checkpoint(runs["tp2"], 4) / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"]
              for r in (0, 1)]
    for name in ("blocks.0.attn.q_norm.weight", "blocks.1.attn.k_norm.weight"):
        assert shards[0][name].shape == (32,) and (single.get(name) - 1).abs().max() > 1e-3, "trained, not ones"
        assert torch.equal(shards[0][name], shards[1][name]), name
        assert torch.allclose(shards[0][name], single.get(name), rtol=0, atol=1e-5), name
