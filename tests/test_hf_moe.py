"""model.hf_config naming a transformers Mixture-of-Experts model: it trains with its routers' load-balancing loss,
as transformers' own loss has it, and logs that loss and the expert load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from distributed_helpers import launch_training
from test_trainer import STEPS, TINY, assert_ok, short_run

from dist_train.config import ModelConfig
from dist_train.model.hf import HFCausalLM
from dist_train.model.loss import IGNORE_INDEX
from dist_train.monitor.jsonl import read_metrics

AUX_COEF = 0.02
EXPERTS, TOP_K = 4, 2
TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, router_aux_loss_coef=AUX_COEF, num_experts_per_tok=TOP_K)


def moe_config(arch: str, vocab_size: int = 64):
    """A tiny transformers MoE config: EXPERTS routed experts per layer, TOP_K per token."""
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(vocab_size=vocab_size, num_local_experts=EXPERTS, **TINY_SHAPE)
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(vocab_size=vocab_size, num_experts=EXPERTS, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, **TINY_SHAPE)
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=vocab_size, num_experts=EXPERTS, moe_intermediate_size=32, head_dim=8,
                          **TINY_SHAPE)


def build(hf_cfg, folder: Path) -> HFCausalLM:
    hf_cfg.save_pretrained(folder)
    torch.manual_seed(0)
    return HFCausalLM(ModelConfig(hf_config=str(folder))).train()


def shifted(ids: torch.Tensor) -> torch.Tensor:
    """Our labels for `ids`: the next token, aligned with the logits (the last position has none)."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_training_loss_plus_auxiliary_loss_is_transformers_own_moe_loss(arch: str, tmp_path) -> None:
    """Our LM loss + auxiliary_loss() is the loss transformers computes given the labels: its cross-entropy plus
    router_aux_loss_coef x its load-balancing loss."""
    model = build(moe_config(arch), tmp_path)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(ids, shifted(ids))
    aux = model.auxiliary_loss()
    hf = model.model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    print(f"{arch}: lm {loss.item():.6f} + aux {aux.item():.6f} vs transformers {hf.loss.item():.6f}")
    assert hf.loss.item() - loss.item() > 1e-3, "the load-balancing loss must weigh in for this test to mean much"
    assert (loss + aux).item() == pytest.approx(hf.loss.item(), abs=1e-6)
    assert aux.item() == pytest.approx(AUX_COEF * hf.aux_loss.item(), abs=1e-7)
    # It reaches the routers: every layer's router weight gets a gradient from it alone.
    aux.backward()
    routers = [p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


def test_router_window_logs_the_mean_load_balancing_loss_and_expert_load(tmp_path) -> None:
    """take() gives the mean unweighted loss of the training forwards since the last take, and the smallest and
    largest share of routed token slots any expert of any layer took; eval and no-grad forwards add nothing."""
    model = build(moe_config("mixtral"), tmp_path)
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    aux, counts = [], torch.zeros(2, EXPERTS)
    for ids in batches:
        model(ids, shifted(ids))
        with torch.no_grad():
            hf = model.model(input_ids=ids, output_router_logits=True, use_cache=False)
        aux.append(hf.aux_loss.item())
        for layer, logits in enumerate(hf.router_logits):  # (tokens, E)
            counts[layer] += torch.bincount(logits.topk(TOP_K, dim=-1).indices.flatten(), minlength=EXPERTS)
    with torch.no_grad():
        model(batches[0], shifted(batches[0]))
    assert model.auxiliary_loss() is None
    model.eval()
    model(batches[0], shifted(batches[0]))
    assert model.auxiliary_loss() is None

    logged = model.router_window.take()
    shares = counts / counts.sum(-1, keepdim=True)
    print(f"logged {logged}, expert shares {shares.tolist()}")
    assert logged["moe_aux_loss"] == pytest.approx(sum(aux) / 2, rel=1e-5)
    assert logged["moe_load_min"] == pytest.approx(shares.min().item())
    assert logged["moe_load_max"] == pytest.approx(shares.max().item())
    assert model.router_window.take() == {}  # a new window


def test_dense_hf_model_has_no_router_loss_or_window(tmp_path) -> None:
    from transformers import LlamaConfig

    model = build(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2), tmp_path)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, shifted(ids)).backward()
    assert model.auxiliary_loss() is None
    assert model.router_window is None


def test_mixtral_hf_config_trains_and_logs_its_load_balancing_loss(shard_dir, tmp_path) -> None:
    """A real run (launch/train.py, one process): every log line carries the routers' loss and expert load."""
    hf_dir = tmp_path / "mixtral_tiny"
    moe_config("mixtral", vocab_size=2048).save_pretrained(hf_dir)
    run = tmp_path / "run"
    proc = launch_training(TINY, short_run(shard_dir, run, f"model.hf_config={hf_dir}", "train.micro_batch_size=2",
                                           "train.grad_accum_steps=2"), nproc=1, launcher="python")
    assert_ok(proc)
    records = [r for r in read_metrics(run) if "loss" in r]
    for r in records:
        print({k: r[k] for k in ("step", "loss", "moe_aux_loss", "moe_load_min", "moe_load_max")})
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        # transformers' loss is top_k x E x sum(load share x mean router probability): TOP_K when balanced.
        assert math.isfinite(r["moe_aux_loss"]) and TOP_K * 0.9 < r["moe_aux_loss"] < TOP_K * EXPERTS
        assert 0 <= r["moe_load_min"] <= 1 / EXPERTS <= r["moe_load_max"] <= 1
    assert records[-1]["loss"] < records[0]["loss"]
