"""The learning-rate schedules (warmup, then cosine, WSD or constant), the retarget of a resumed schedule to a new
train.lr, and which parameters get weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_train.config import load_config
from dist_train.model.build import build_model
from dist_train.train.optim import build_optimizer, build_scheduler, lr_at, param_groups, retarget_scheduler

TINY = "configs/tiny.yaml"


def train_cfg(*overrides: str):
    return load_config(TINY, ["data.path=unused", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10",
                              "train.max_steps=110", *overrides]).train


def scheduled(t, steps: int) -> list[float]:
    """The lr each optimizer step uses, as the trainer reads it (param_groups[0] before the step)."""
    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_rises_linearly_to_lr_in_every_schedule():
    for schedule in ("cosine", "wsd", "constant"):
        lrs = scheduled(train_cfg(f"train.schedule={schedule}"), 10)
        assert lrs == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)], rel=1e-12), schedule


def test_cosine_decays_from_lr_to_min_lr_at_the_last_step():
    t = train_cfg("train.schedule=cosine")
    lrs = scheduled(t, t.max_steps)
    assert lrs == pytest.approx([lr_at(s, t) for s in range(t.max_steps)], rel=1e-12)
    after = lrs[10:]
    assert after[0] == pytest.approx(1e-3) and after[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(after, after[1:], strict=False)), "strictly falling after warmup"
    middle = 10 + (t.max_steps - 10 - 1) / 2  # the cosine's half-way point lies half-way between lr and min_lr
    assert lr_at(math.floor(middle), t) > 5.5e-4 > lr_at(math.ceil(middle), t)


def test_wsd_holds_lr_then_decays_linearly_over_the_last_fraction():
    t = train_cfg("train.schedule=wsd", "train.decay_fraction=0.2")
    lrs = scheduled(t, t.max_steps)
    decay_start = t.max_steps - round(0.2 * t.max_steps)  # 88
    assert lrs[10:decay_start] == [pytest.approx(1e-3)] * (decay_start - 10)
    decay = lrs[decay_start:]
    assert decay[0] == pytest.approx(1e-3) and decay[-1] == pytest.approx(1e-4)
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert steps == pytest.approx([steps[0]] * len(steps), rel=1e-9), "linear"


def test_constant_stays_at_lr_after_warmup():
    t = train_cfg("train.schedule=constant")
    assert scheduled(t, t.max_steps)[10:] == [pytest.approx(1e-3)] * (t.max_steps - 10)


def test_resume_with_a_new_lr_retargets_the_restored_schedule():
    """A checkpoint restores the old run's base lr; the resumed run's train.lr (and max_steps) take over at
    the step the checkpoint reached, on every parameter group."""
    old = train_cfg("train.schedule=cosine")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, old)
    scheduler = build_scheduler(optimizer, old)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()

    new = train_cfg("train.schedule=cosine", "train.lr=5e-4", "train.max_steps=200")
    optimizer2 = build_optimizer(model, new)
    scheduler2 = build_scheduler(optimizer2, new)
    scheduler2.load_state_dict(saved)
    assert optimizer2.param_groups[0]["lr"] != pytest.approx(lr_at(30, new))  # not yet retargeted
    retarget_scheduler(scheduler2, new)
    assert len(optimizer2.param_groups) == 2
    assert [g["lr"] for g in optimizer2.param_groups] == [pytest.approx(lr_at(30, new))] * 2
    optimizer2.step()
    scheduler2.step()
    assert [g["lr"] for g in optimizer2.param_groups] == [pytest.approx(lr_at(31, new))] * 2


@pytest.mark.parametrize("options", [(), ("model.norm=layernorm", "model.pos=learned", "model.mlp=gelu",
                                          "model.bias=true", "model.tie_embeddings=false",
                                          "model.layerscale_init=0.1")], ids=["llama-tied", "gpt2-untied"])
def test_weight_decay_applies_to_the_matrices_of_linear_layers_only(options):
    """Decayed: attention and MLP projections and an untied output head. Not decayed: the embedding tables
    (token and position; a tied head is the token table), norm gains and biases, LayerScale gains."""
    m = load_config(TINY, ["data.path=unused", "model.n_layers=2", *options]).model
    model = build_model(m)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    linear_weights = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if m.tie_embeddings:
        linear_weights.discard("lm_head.weight")  # the same tensor as tok_emb.weight, named once
    assert decayed == linear_weights
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "tok_emb.weight" in kept and all(torch.is_tensor(p) for p in no_decay["params"])
    assert kept == set(names.values()) - decayed
    assert not any(n.endswith(".weight") and n in linear_weights for n in kept)
    print(f"decayed {sorted(decayed)}\nnot decayed {sorted(kept)}")
