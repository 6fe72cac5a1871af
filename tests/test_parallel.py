"""Tensor parallelism (DeepSpeed AutoTP) and sequence parallelism (DeepSpeed-Ulysses): the refusals of layouts
that cannot work, and real multi-process runs on the CPU whose losses equal one process's."""

from __future__ import annotations

import json
from pathlib import Path


import pytest
import torch
from distributed_helpers import REPO, run_distributed
from resume_helpers import (
    checkpoint,
    command,
    kill_tree,
    logged_step,
    losses,
    optimizer_tensors,
    overrides,
    run,
    shared_run,
    start,
    tail,
    tensor_parallel_logits,
    wait_until,
)

from dist_train.config import ConfigError, load_config
from dist_train.engine.ds_config import deepspeed_config
from dist_train.train.preflight import preflight

TINY = REPO / "configs" / "tiny.yaml"  # n_heads 4, n_kv_heads 2, seq_len 128


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    return str(e.value)


def preflight_refused(overrides: list[str], world_size: int) -> str:
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as e:
        preflight(cfg, world_size)
    return str(e.value)


def test_tensor_size_that_does_not_divide_the_kv_heads_is_refused():
    message = refused(["parallel.tensor=4"])
    assert "parallel.tensor=4 does not divide the model's 2 key/value heads" in message
    assert "model.n_heads, model.n_kv_heads" in message and "set parallel.tensor to a divisor of 2" in message


def test_sequence_size_that_does_not_divide_the_heads_is_refused():
    message = refused(["parallel.sequence=3"])
    assert "parallel.sequence=3 does not divide the model's 4 attention heads" in message


def test_seq_len_not_divisible_by_the_sequence_size_is_refused():
    message = refused(["parallel.sequence=2", "model.seq_len=127"])
    assert "model.seq_len (127) is not divisible by parallel.sequence (2)" in message
    assert "set model.seq_len to a multiple of 2" in message


def test_tensor_parallelism_with_zero3_is_refused():
    message = refused(["parallel.tensor=2", "deepspeed.zero_stage=3"])
    assert "parallel.tensor=2 needs deepspeed.zero_stage 0, 1 or 2" in message
    assert "set deepspeed.zero_stage=2" in message


def test_tensor_and_sequence_parallelism_together_are_refused():
    message = refused(["parallel.tensor=2", "parallel.sequence=2"])
    assert "parallel.tensor=2 with parallel.sequence=2" in message and "parallel.sequence=1" in message


def test_world_size_not_divisible_by_the_model_parallel_groups_is_refused(shard_dir):
    message = preflight_refused([f"data.path={shard_dir}", "parallel.tensor=2"], world_size=3)
    assert ("the world size (3 processes) is not divisible by parallel.tensor (2) x parallel.sequence (1) = 2"
            in message)


def test_hf_config_heads_not_divisible_by_the_tensor_size_are_refused(shard_dir, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                vocab_size=2048, max_position_embeddings=256).save_pretrained(tmp_path)
    message = preflight_refused([f"data.path={shard_dir}", f"model.hf_config={tmp_path}", "parallel.tensor=2"],
                                world_size=2)
    assert "parallel.tensor=2 does not divide the model's 3 attention heads" in message
    assert f"num_attention_heads, num_key_value_heads in {tmp_path}" in message


def test_sequence_parallelism_of_an_hf_model_without_sdpa_attention_is_refused(shard_dir, tmp_path):
    from transformers import BloomConfig

    BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=2048).save_pretrained(tmp_path)
    message = preflight_refused([f"data.path={shard_dir}", f"model.hf_config={tmp_path}", "parallel.sequence=2"],
                                world_size=2)
    assert "parallel.sequence=2: BloomForCausalLM" in message and "has no sdpa attention" in message
    assert "set parallel.sequence=1" in message


def test_generated_deepspeed_config_counts_data_parallel_ranks_and_shards_our_layers():
    cfg = load_config(TINY, ["parallel.tensor=2", "train.micro_batch_size=4", "train.global_batch_size=16"])
    ds = deepspeed_config(cfg, world_size=4)  # 2 data-parallel ranks
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    specs = ds["tensor_parallel"]["partition_config"]["layer_specs"]
    assert ds["tensor_parallel"]["autotp_size"] == 2 and [s["partition_type"] for s in specs] == ["column", "row"]
    sp = deepspeed_config(load_config(TINY, ["parallel.sequence=2", "train.micro_batch_size=4",
                                             "train.global_batch_size=16"]), world_size=4)
    assert sp["train_batch_size"] == 16 and sp["gradient_accumulation_steps"] == 2 and "tensor_parallel" not in sp


# ---------------------------------------------------------------------------------------------------------------
# Real runs: fp32, the 2-layer tiny model, global batch 8 sequences at every layout, 10 steps, checkpoints at 5, 10.

STEPS = 10
TEN_STEPS = ("train.max_steps=10", "checkpoint.every=5", "train.eval_every=5", "train.eval_steps=2")
TP2 = (*TEN_STEPS, "parallel.tensor=2")
SP2 = (*TEN_STEPS, "parallel.sequence=2")


@pytest.fixture(scope="module")
def single(tmp_path_factory, shard_dir) -> Path:
    return shared_run(tmp_path_factory, shard_dir, "parallel_x1", 1, *TEN_STEPS)


@pytest.fixture(scope="module")
def tensor2(tmp_path_factory, shard_dir) -> Path:
    return shared_run(tmp_path_factory, shard_dir, "parallel_tp2", 2, *TP2)


@pytest.fixture(scope="module")
def sequence2(tmp_path_factory, shard_dir) -> Path:
    return shared_run(tmp_path_factory, shard_dir, "parallel_sp2", 2, *SP2)


def assert_losses_equal(run_dir: Path, reference: Path, same_val_batches: bool = True) -> None:
    """Per-step training losses (rel 1e-4) and tokens; validation losses too where both runs evaluate the same
    batches (one data-parallel rank each: each data-parallel rank evaluates train.eval_steps batches of its own)."""
    ours, theirs = losses(run_dir), losses(reference)
    print(f"losses {run_dir.name}: {ours}\nlosses {reference.name}: {theirs}")
    assert sorted(ours) == list(range(1, STEPS + 1)) and sorted(theirs) == sorted(ours)
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), step
    # Tokens (and so FLOPs per step and MFU) count each sequence once, not once per tensor/sequence rank.
    assert step_values(run_dir, "tokens") == step_values(reference, "tokens")
    assert step_values(run_dir, "tokens")[STEPS] == STEPS * 8 * 128
    ours, theirs = step_values(run_dir, "val_loss"), step_values(reference, "val_loss")
    assert sorted(ours) == [5, 10]
    if same_val_batches:
        assert ours == pytest.approx(theirs, rel=1e-4)


def step_values(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def module_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every model-parallel rank's module state (a TP rank holds its shards)."""
    out = {}
    for path in sorted(ckpt.glob("mp_rank_*_model_states.pt")):
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        out.update({f"{path.name}:{name}": tensor for name, tensor in module.items()})
    return out


@pytest.mark.slow
def test_tensor_parallel_losses_equal_one_process(single, tensor2):
    assert_losses_equal(tensor2, single)
    ckpt = checkpoint(tensor2, STEPS)
    shards = [torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"] for r in (0, 1)]
    q = "blocks.0.attn.q_proj.weight"
    assert shards[0][q].shape == (64, 128) and not torch.equal(shards[0][q], shards[1][q]), "q_proj is split"
    assert shards[0]["blocks.0.attn.o_proj.weight"].shape == (128, 64), "o_proj is split by input columns"
    assert torch.equal(shards[0]["norm_f.weight"], shards[1]["norm_f.weight"]), "norms stay whole"


@pytest.mark.slow
def test_sequence_parallel_losses_equal_one_process(single, sequence2):
    assert_losses_equal(sequence2, single)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.sequence=2"])
def test_four_processes_with_two_data_parallel_groups_equal_one_process(single, shard_dir, tmp_path, layout):
    assert run(command(overrides(shard_dir, tmp_path, *TEN_STEPS, layout), nproc=4), tmp_path / "train.log") == 0, \
        tail(tmp_path / "train.log")
    assert_losses_equal(tmp_path, single, same_val_batches=False)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tensor", "sequence"])
def test_kill_and_resume_matches_uninterrupted_run_bit_for_bit(request, shard_dir, tmp_path, layout):
    reference = request.getfixturevalue(f"{layout}2")
    cmd, log = command(overrides(shard_dir, tmp_path, *(TP2 if layout == "tensor" else SP2)), nproc=2), \
        tmp_path / "train.log"
    proc = start(cmd, log)
    wait_until(lambda: logged_step(tmp_path) >= 7, proc)  # past the checkpoint at step 5
    kill_tree(proc)
    assert run(cmd, log) == 0, tail(log)
    assert "resumed from" in log.read_text()
    assert losses(tmp_path) == losses(reference)
    ours, theirs = module_tensors(checkpoint(tmp_path, STEPS)), module_tensors(checkpoint(reference, STEPS))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    oa, ob = optimizer_tensors(checkpoint(tmp_path, STEPS)), optimizer_tensors(checkpoint(reference, STEPS))
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key
    print(f"{layout}: {len(ours)} weight tensors and {len(oa)} optimizer tensors identical after the kill")


@pytest.mark.slow
def test_export_of_a_tensor_parallel_run_loads_in_transformers_with_the_runs_logits(tensor2, tmp_path):
    from transformers import AutoModelForCausalLM

    from dist_train.checkpoint.weights import checkpoint_weights
    from dist_train.tools.export import export

    ckpt = checkpoint(tensor2, STEPS)
    out = export(checkpoint_weights(ckpt), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (128, 128), "the shards were joined"
    ids = torch.randint(0, 2048, (2, 128), generator=torch.Generator().manual_seed(0))
    run_logits = run_distributed(tensor_parallel_logits, 2, str(ckpt), ids)[0]
    with torch.no_grad():
        hf_logits = hf(ids).logits
    print(f"max |HF - TP engine| logit difference: {(hf_logits - run_logits).abs().max().item():.2e}")
    torch.testing.assert_close(hf_logits, run_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Sizing: the memory estimate against real engines, and long sequences.

def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of `model(ids, labels)`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # also their transposed views
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids.roll(-1, dims=1))
    return sum(storages.values())


SIZING_CASES = [("parallel.tensor=2", 1), ("parallel.sequence=2", 2)]


def _measure_parallel_engines(rank: int, world_size: int, shard_dir: str) -> list[dict[str, int]]:
    from test_scaling import _held_bytes

    from dist_train.distributed import import_deepspeed
    from dist_train.engine.parallel import ParallelLayout, set_up_parallel
    from dist_train.model.build import build_model

    results = []
    for layout, stage in SIZING_CASES:
        cfg = load_config(TINY, [f"data.path={shard_dir}", layout, f"deepspeed.zero_stage={stage}",
                                 "precision=fp32", "train.micro_batch_size=2", "train.grad_accum_steps=1"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        mpu = set_up_parallel(cfg, model)
        engine, *_ = import_deepspeed().initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                   config=deepspeed_config(cfg, world_size), mpu=mpu)
        place = ParallelLayout.of(cfg, rank, world_size)
        ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len), generator=torch.Generator().manual_seed(1))
        width = cfg.model.seq_len // place.sequence
        ids = ids[:, place.sequence_rank * width:(place.sequence_rank + 1) * width]
        for _ in range(2):  # the second backward runs with optimizer states allocated
            engine.backward(engine(ids, ids.roll(-1, dims=1)))
            held = _held_bytes(engine)  # before the step, while the gradients exist (as in test_scaling)
            engine.step()
        held["activations"] = saved_bytes(engine, ids)
        results.append(held)
        engine.destroy()
    return results


@pytest.mark.slow
def test_memory_estimate_matches_tensor_and_sequence_parallel_engines_in_two_processes(shard_dir):
    from dist_train.scaling.memory import activation_bytes_per_token, estimate_memory

    per_rank = run_distributed(_measure_parallel_engines, 2, str(shard_dir))
    for i, (layout, stage) in enumerate(SIZING_CASES):
        cfg = load_config(TINY, [f"data.path={shard_dir}", layout, f"deepspeed.zero_stage={stage}",
                                 "precision=fp32", "train.micro_batch_size=2"])
        est = estimate_memory(cfg, gpus=2)
        m, tp, sp = cfg.model, cfg.parallel.tensor, cfg.parallel.sequence
        per_layer, head = activation_bytes_per_token(m, "fp32", tp, sp)
        tokens = 2 * m.seq_len // sp
        saved = tokens * (m.n_layers * per_layer + head) + 2 * (m.seq_len // sp) * m.head_dim * 4  # + RoPE tables
        for rank, measured in enumerate(r[i] for r in per_rank):
            print(f"{layout} ZeRO-{stage} rank {rank}: model states held {measured['model_states']:,} B, estimated "
                  f"{est.model_states:,} B; activations saved {measured['activations']:,} B, estimated {saved:,} B")
            assert measured["model_states"] == pytest.approx(est.model_states, rel=0.02)
            assert measured["activations"] == pytest.approx(saved, rel=0.02)


LONG = ["model.seq_len=8192", "model.n_layers=2", "model.d_model=64", "model.d_ff=176", "precision=fp32",
        "model.attention=sdpa", "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.lr=3e-3",
        "train.warmup_steps=0", "train.schedule=constant", "deepspeed.zero_stage=1"]


def _long_sequence_worker(rank: int, world_size: int, shard_dir: str) -> dict[str, object]:
    """Saved activation bytes of one 8192-token sequence whole (one rank's view without SP) and as this rank's
    half under SP=2, then a few real training steps at SP=2."""
    from dist_train.data.parallel import rank_batches
    from dist_train.distributed import import_deepspeed
    from dist_train.engine.parallel import set_up_parallel
    from dist_train.model.build import build_model
    from dist_train.train.optim import build_optimizer

    whole = load_config(TINY, [f"data.path={shard_dir}", *LONG])
    cfg = load_config(TINY, [f"data.path={shard_dir}", *LONG, "parallel.sequence=2"])
    data = rank_batches(cfg.data.weighted_paths(), "train", cfg.model.seq_len, 1, cfg.train.seed, 0, 1, rank, 2)
    inputs, _ = data.loader.next_batch()  # (1, 8192): the whole first sequence
    data.reset()
    torch.manual_seed(0)
    unsharded = saved_bytes(build_model(whole.model).train(), inputs)
    model = build_model(cfg.model)
    mpu = set_up_parallel(cfg, model)
    engine, *_ = import_deepspeed().initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                               config=deepspeed_config(cfg, world_size), mpu=mpu)
    sharded = saved_bytes(engine, inputs[:, rank * 4096:(rank + 1) * 4096])
    losses_ = []
    for _ in range(4):
        x, y = data.next_batch()  # (1, 4096): this rank's half
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        whole_loss = loss.detach().clone()
        torch.distributed.all_reduce(whole_loss, group=mpu.get_sequence_parallel_group())  # shares -> the mean
        losses_.append(whole_loss.item())
    return {"unsharded": unsharded, "sharded": sharded, "losses": losses_}


@pytest.mark.slow
def test_sequence_parallel_halves_the_saved_activations_of_an_8192_token_sequence_and_trains(shard_dir):
    from dist_train.scaling.memory import activation_bytes

    results = run_distributed(_long_sequence_worker, 2, str(shard_dir))
    cfg = load_config(TINY, [f"data.path={shard_dir}", *LONG])
    for rank, r in enumerate(results):
        print(f"rank {rank}: saved activations of one 8192-token sequence: SP=1 {r['unsharded']:,} B, "
              f"SP=2 {r['sharded']:,} B per rank ({r['sharded'] / r['unsharded']:.3f}); losses {r['losses']}")
        assert 0.45 < r["sharded"] / r["unsharded"] < 0.55
    estimates = [activation_bytes(cfg.model, "fp32", 1, False, sequence=sp) for sp in (1, 2)]
    print(f"estimated peak activations: SP=1 {estimates[0]:,} B, SP=2 {estimates[1]:,} B")
    assert 0.45 < estimates[1] / estimates[0] < 0.55
    losses_ = results[0]["losses"]
    assert results[1]["losses"] == losses_, "both ranks report the mean over the whole sequence"
    assert all(torch.isfinite(torch.tensor(losses_))) and losses_[-1] < losses_[0] - 0.1


# ---------------------------------------------------------------------------------------------------------------
# model.hf_config models: AutoTP through transformers' tensor-parallel plan, Ulysses through DeepSpeed's ALST.

def _hf_parallel_worker(rank: int, world_size: int, hf_dir: str, shard_dir: str) -> dict[str, list[float]]:
    """3 steps of a transformers Llama: plain torch on the whole batch (the reference), then DeepSpeed engines at
    TP=2 and at SP=2 on the same batches, from the same initial weights."""
    from dist_train.distributed import import_deepspeed
    from dist_train.engine.parallel import ParallelLayout, set_up_parallel
    from dist_train.model.build import build_model

    base = [f"data.path={shard_dir}", f"model.hf_config={hf_dir}", "precision=fp32", "train.micro_batch_size=2",
            "train.grad_accum_steps=1", "deepspeed.zero_stage=1", "train.grad_clip=0"]
    ids = torch.randint(0, 2048, (3, 2, 128), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(load_config(TINY, base).model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out: dict[str, list[float]] = {"reference": []}
    for x in ids:  # attention built before any sequence-parallel registration: plain sdpa
        loss = model(x, x.roll(-1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out["reference"].append(loss.item())
    for layout in ("parallel.tensor=2", "parallel.sequence=2"):
        cfg = load_config(TINY, [*base, layout])
        model = build_model(cfg.model)
        model.load_state_dict(initial)
        mpu = set_up_parallel(cfg, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = import_deepspeed().initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, world_size), mpu=mpu)
        place = ParallelLayout.of(cfg, rank, world_size)
        width = 128 // place.sequence
        out[layout] = []
        for x in ids:
            part = slice(place.sequence_rank * width, (place.sequence_rank + 1) * width)
            loss = engine(x[:, part], x.roll(-1, dims=1)[:, part])
            engine.backward(loss)
            engine.step()
            whole = loss.detach().clone()
            if place.sequence > 1:
                torch.distributed.all_reduce(whole, group=mpu.get_sequence_parallel_group())
            out[layout].append(whole.item())
        if place.tensor > 1:
            q = engine.module.model.model.layers[0].self_attn.q_proj.weight
            assert q.shape[0] == 32, f"q_proj is not split: {tuple(q.shape)}"
        engine.destroy()
    return out


@pytest.mark.slow
def test_hf_config_model_trains_with_tensor_and_sequence_parallelism_like_one_process(shard_dir, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=2048, max_position_embeddings=128).save_pretrained(tmp_path)
    results = run_distributed(_hf_parallel_worker, 2, str(tmp_path), str(shard_dir))
    for rank, r in enumerate(results):
        print(f"rank {rank}: {r}")
        for layout in ("parallel.tensor=2", "parallel.sequence=2"):
            assert r[layout] == pytest.approx(r["reference"], rel=1e-4), layout


def test_preflight_refuses_a_run_whose_estimated_peak_exceeds_the_gpu_and_names_the_parallel_keys():
    from dist_train.train.preflight import check_memory

    long = ["model.n_layers=32", "model.d_model=4096", "model.n_heads=32", "model.n_kv_heads=32",
            "model.d_ff=11008", "model.vocab_size=32000", "model.seq_len=32768", "precision=bf16",
            "deepspeed.zero_stage=2", "train.micro_batch_size=1", "model.tie_embeddings=false"]
    h100 = 80 * 2**30
    with pytest.raises(ConfigError) as e:
        check_memory(load_config(TINY, long), world_size=8, device_bytes=h100)
    assert "exceeds the GPU's 80.0 GiB" in str(e.value) and "raise parallel.sequence (activations)" in str(e.value)
    check_memory(load_config(TINY, [*long, "parallel.sequence=8"]), world_size=8, device_bytes=h100)  # 48.6 GiB


def _sliced_logits_worker(rank: int, world_size: int) -> list[float]:
    """Max |logits of the whole sequence - logits of the SP=2 slices| for RoPE and learned positions, with
    weights large enough (init_std 0.3) that attention depends strongly on position. In float64: at that scale
    the softmax is nearly one-hot, and where two scores nearly tie, a last-bit difference between the GEMMs of
    128 and 64 rows flips it (once in a CI run: 3.6e-2 in fp32)."""
    import torch.distributed as dist

    from dist_train.model import sequence_parallel
    from dist_train.model.build import build_model

    differences = []
    for pos, norm, mlp in (("rope", "rmsnorm", "swiglu"), ("learned", "layernorm", "gelu")):
        cfg = load_config(TINY, [f"model.pos={pos}", f"model.norm={norm}", f"model.mlp={mlp}", "model.init_std=0.3",
                                 "model.n_layers=2", "model.attention=sdpa"]).model
        torch.manual_seed(0)
        model = build_model(cfg).double().eval()
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            whole = model(ids)
            sequence_parallel.enable(model, dist.new_group([0, 1]))
            half = model(ids[:, rank * 64:(rank + 1) * 64]).contiguous()
        slices = [torch.empty_like(half) for _ in range(2)]
        dist.all_gather(slices, half)
        differences.append((torch.cat(slices, dim=1) - whole).abs().max().item())
    return differences


@pytest.mark.slow
def test_sequence_parallel_slices_give_the_whole_sequences_logits_with_global_positions():
    for rank, (rope, learned) in enumerate(run_distributed(_sliced_logits_worker, 2)):
        print(f"rank {rank}: max |SP=2 - whole| logits: rope {rope:.2e}, learned {learned:.2e}")
        assert rope < 1e-4 and learned < 1e-4
