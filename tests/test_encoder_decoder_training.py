"""The encoder-decoder trains through the same trainer on span corruption, with real DeepSpeed on 2 gloo processes:
ZeRO 0-3 agree step by step, a SIGKILLed run resumes bit for bit, a 2-process checkpoint continues on 1 process,
and the checkpoint evaluates, averages and exports to a transformers class that computes its logits."""

from __future__ import annotations

import pytest
import torch
from resume_helpers import (
    STEPS,
    checkpoint,
    command,
    kill_tree,
    logged_step,
    losses,
    overrides,
    run,
    start,
    tail,
    wait_until,
)
from transformers import AutoModelForSeq2SeqLM

from dist_train.checkpoint.weights import checkpoint_weights, open_weights
from dist_train.data.build import build_loader
from dist_train.model.build import build_model
from dist_train.tools.average import average_checkpoints
from dist_train.tools.evaluate import evaluate
from dist_train.tools.export import export

pytestmark = pytest.mark.slow

# tiny.yaml (GQA, tied, rmsnorm) as a T5-layout encoder-decoder, sentinels above the tokenizer's 2,048 ids.
ENCDEC = ("model.arch=encoder_decoder", "model.pos=relative", "model.mlp=geglu", "model.vocab_size=2112",
          "model.norm_eps=1e-6")
RESUME_AT = 2


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, shard_dir) -> dict[int, object]:
    """6 fp32 steps of 2 processes at ZeRO 0-3 (global batch 8, a checkpoint every 2 steps)."""
    runs = {}
    for stage in range(4):
        run_dir = tmp_path_factory.mktemp(f"encdec_zero{stage}")
        cmd = command(overrides(shard_dir, run_dir, *ENCDEC, f"deepspeed.zero_stage={stage}"), nproc=2)
        assert run(cmd, run_dir / "train.log") == 0, tail(run_dir / "train.log")
        runs[stage] = run_dir
    return runs


def test_zero_stages_agree_step_by_step(stage_runs):
    curves = {stage: losses(run_dir) for stage, run_dir in stage_runs.items()}
    print("\n".join(f"ZeRO-{s}: {c}" for s, c in curves.items()))
    assert sorted(curves[0]) == list(range(1, STEPS + 1))
    for stage in (1, 2, 3):
        for step, loss in curves[0].items():
            assert curves[stage][step] == pytest.approx(loss, rel=1e-4), (stage, step)
    assert curves[0][STEPS] < curves[0][1], "the loss should fall over the first steps"


def test_sigkill_and_resume_matches_the_uninterrupted_run_bit_for_bit(stage_runs, shard_dir, tmp_path):
    reference = stage_runs[2]
    cmd, log = command(overrides(shard_dir, tmp_path, *ENCDEC, "deepspeed.zero_stage=2"), nproc=2), tmp_path / "log"
    proc = start(cmd, log)
    wait_until(lambda: logged_step(tmp_path) >= 3, proc)
    kill_tree(proc)  # SIGKILL to the launcher and both workers, after step 3 (the step-2 checkpoint is complete)
    assert run(cmd, log) == 0, tail(log)
    assert "resumed from" in log.read_text()
    assert losses(tmp_path) == losses(reference)
    a, b = checkpoint_weights(checkpoint(tmp_path, STEPS)), checkpoint_weights(checkpoint(reference, STEPS))
    assert a.names == b.names
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name)), name


def test_two_process_checkpoint_continues_the_curve_on_one_process(stage_runs, shard_dir, tmp_path):
    saved = stage_runs[2]
    cmd = command(overrides(shard_dir, tmp_path, *ENCDEC, "deepspeed.zero_stage=2"), 1,
                  args=("--resume", str(checkpoint(saved, RESUME_AT))))
    assert run(cmd, tmp_path / "log") == 0, tail(tmp_path / "log")
    resumed, uninterrupted = losses(tmp_path), losses(saved)
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
    gaps = {s: abs(resumed[s] - uninterrupted[s]) for s in resumed}
    print(f"2 -> 1 process: |resumed - uninterrupted| per step {gaps}")
    assert max(gaps.values()) < 1e-4


def test_zero3_checkpoint_exports_evaluates_and_averages(stage_runs, tokenizer_dir, tmp_path):
    run_dir = stage_runs[3]  # built under zero.Init: the checkpoint holds per-rank partitions
    weights = open_weights(run_dir)
    ours = weights.load_into(build_model(weights.config.model)).eval()
    hf = AutoModelForSeq2SeqLM.from_pretrained(export(weights, tmp_path / "hf", tokenizer_dir)).eval()
    encoder_ids, decoder_ids, labels = build_loader(weights.config, "val", 0, 1, 2112, micro_batch_size=2).next_batch()
    with torch.no_grad():
        gap = (ours(encoder_ids, decoder_ids) - hf(input_ids=encoder_ids, decoder_input_ids=decoder_ids).logits)
    assert type(hf).__name__ == "T5ForConditionalGeneration" and gap.abs().max().item() < 1e-5
    generated = hf.generate(encoder_ids[:1], max_new_tokens=8, do_sample=False)[0].tolist()
    assert generated == ours.greedy(encoder_ids[:1], 0, 8)[0].tolist()[:len(generated)]

    result = evaluate([weights], max_samples=16, batch_size=8, unigram_tokens=200_000, device=torch.device("cpu"))
    model_row, unigram_row = result["rows"]
    with torch.no_grad():
        direct = ours(encoder_ids, decoder_ids, labels).item()
    print(f"evaluate: {model_row['val_loss']:.4f} (unigram of the targets {unigram_row['val_loss']:.4f}); "
          f"one val batch {direct:.4f}")
    assert abs(model_row["val_loss"] - direct) < 0.5 and result["val_windows"] == 16

    tensors, steps, _ = average_checkpoints([checkpoint(run_dir, STEPS)] * 2)
    assert steps == [STEPS, STEPS]
    assert all(torch.equal(tensors[n], weights.get(n)) for n in weights.unique_names)


def test_hf_t5_config_trains_at_zero3_in_bf16_and_exports(shard_dir, tmp_path, tokenizer_dir):
    """model.hf_config naming a T5 config: AutoModelForSeq2SeqLM built under zero.Init, trained on the same span
    corruption in bf16, exported as itself."""
    from transformers import T5Config

    T5Config(vocab_size=2112, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
             feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=0,
             decoder_start_token_id=0).save_pretrained(tmp_path / "t5")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cmd = command(overrides(shard_dir, run_dir, "model.arch=encoder_decoder", f"model.hf_config={tmp_path / 't5'}",
                            "deepspeed.zero_stage=3", "precision=bf16", "train.lr=3e-3"), nproc=2)
    assert run(cmd, run_dir / "train.log") == 0, tail(run_dir / "train.log")
    curve = losses(run_dir)
    print(f"T5ForConditionalGeneration (hf_config, ZeRO-3, bf16): {curve}")
    assert curve[STEPS] < curve[1]
    weights = open_weights(run_dir)
    hf = AutoModelForSeq2SeqLM.from_pretrained(export(weights, tmp_path / "hf", tokenizer_dir))
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    trained = {n: weights.get(n) for n in weights.unique_names}
    assert torch.equal(hf.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"],
                       trained["model.encoder.block.1.layer.1.DenseReluDense.wo.weight"])
