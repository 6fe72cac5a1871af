"""data.document_mask in real runs: sequence parallelism (Ulysses) and tensor parallelism give one process's logits
and losses, evaluate applies the mask, and the HF export given positions that restart after each EOS gives the
run's logits and validation loss (transformers' own packed-sequence masking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import REPO, run_distributed
from resume_helpers import checkpoint, command, overrides, run, tail, tensor_parallel_logits

from data_prep.shard import shard_corpus
from dist_train.checkpoint.weights import checkpoint_weights
from dist_train.config import load_config
from dist_train.data.loader import TokenLoader
from dist_train.formats.manifest import read_manifest
from dist_train.model import document_mask
from dist_train.model.build import build_model
from dist_train.model.document_mask import DocumentMask, document_ids, document_positions

TINY = REPO / "configs" / "tiny.yaml"  # Llama-style: rmsnorm, rope, swiglu; n_heads 4, n_kv_heads 2, seq_len 128
MASKED = ("data.document_mask=true", "train.max_steps=4", "checkpoint.every=4")
EOS = 0


def packed_ids(vocab: int) -> torch.Tensor:
    """(2, 128) random ids with an EOS every 5 to 40 tokens: several documents per window."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, 128), generator=gen)
    for row in ids:
        t = int(torch.randint(5, 40, (1,), generator=gen))
        while t < 128:
            row[t] = EOS
            t += int(torch.randint(5, 40, (1,), generator=gen))
    return ids


def _sliced_masked_logits_worker(rank: int, world_size: int) -> list[float]:
    """Max |logits of the whole window (one process) - logits of the SP=2 slices| with the mask on, for RoPE and
    learned positions on SDPA's dense mask and RoPE on FlexAttention's block mask (its CPU forward), and the same
    against the unmasked model (which must differ). float64, weights of init_std 0.3 as in test_parallel's SP test:
    attention depends strongly on position and document."""
    import torch.distributed as dist

    from dist_train.model import sequence_parallel

    out = []
    group = dist.new_group([0, 1])
    for pos, norm, mlp, kernel in (("rope", "rmsnorm", "swiglu", "sdpa"), ("learned", "layernorm", "gelu", "sdpa"),
                                   ("rope", "rmsnorm", "swiglu", "flex")):
        cfg = load_config(TINY, [f"model.pos={pos}", f"model.norm={norm}", f"model.mlp={mlp}", "model.init_std=0.3",
                                 "model.n_layers=2", f"model.attention={kernel}", "data.document_mask=true"]).model
        torch.manual_seed(0)
        model = build_model(cfg).double().eval()
        masked = DocumentMask(EOS, flex="always" if kernel == "flex" else "never")
        ids = packed_ids(cfg.vocab_size)
        with torch.no_grad():
            model.document_mask = masked
            whole = model(ids)
            model.document_mask = None
            plain = model(ids)
            model.document_mask = masked
            sequence_parallel.enable(model, group)
            half = model(ids[:, rank * 64:(rank + 1) * 64]).contiguous()
        slices = [torch.empty_like(half) for _ in range(2)]
        dist.all_gather(slices, half)
        sliced = torch.cat(slices, dim=1)
        out += [(sliced - whole).abs().max().item(), (sliced - plain).abs().max().item()]
    return out


@pytest.mark.slow
def test_sequence_parallel_slices_give_one_process_masked_logits():
    for rank, gaps in enumerate(run_distributed(_sliced_masked_logits_worker, 2)):
        rope, rope_plain, learned, learned_plain, flex, flex_plain = gaps
        print(f"rank {rank}: max |SP=2 - whole| masked logits: rope {rope:.2e}, learned {learned:.2e}, rope on "
              f"FlexAttention {flex:.2e}; against the unmasked model: {rope_plain:.2e}, {learned_plain:.2e}, "
              f"{flex_plain:.2e}")
        assert rope < 1e-5 and learned < 1e-5 and flex < 1e-5
        assert rope_plain > 1e-2 and learned_plain > 1e-2 and flex_plain > 1e-2


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def short_docs_dir(tmp_path_factory, corpus_file, tokenizer_dir, datasets_cache) -> Path:
    """The corpus's first 4,000 paragraphs, each its own document (tens of tokens: several per 128-token window;
    the plays themselves are longer than a window)."""
    paragraphs = [p for line in corpus_file.read_text().splitlines()
                  for p in json.loads(line)["text"].split("\n\n") if p.strip()][:4000]
    corpus = tmp_path_factory.mktemp("paragraphs") / "paragraphs.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    out = tmp_path_factory.mktemp("shards") / "paragraphs"
    shard_corpus([str(corpus)], str(tokenizer_dir), str(out), val_fraction=0.05, seed=0,
                 cache_dir=str(datasets_cache), progress=False)
    return out


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, short_docs_dir) -> Path:
    """One process, 4 steps with data.document_mask (its checkpoint at step 4)."""
    out = tmp_path_factory.mktemp("masked_x1")
    log = out / "train.log"
    assert run(command(overrides(short_docs_dir, out, *MASKED), nproc=1), log) == 0, tail(log)
    return out


@pytest.mark.slow
def test_masked_runs_under_tensor_and_sequence_parallelism_and_grad_checkpointing_equal_one_process(
        masked_run, short_docs_dir, tmp_path):
    reference = step_losses(masked_run)
    print(f"one process, masked: {reference}")
    layouts = {"tp2": (2, "parallel.tensor=2"), "sp2": (2, "parallel.sequence=2"),
               "recompute": (1, "model.grad_checkpointing=true"), "plain": (1, "data.document_mask=false")}
    for name, (nproc, layout) in layouts.items():
        out = tmp_path / name
        out.mkdir()
        log = out / "train.log"
        assert run(command(overrides(short_docs_dir, out, *MASKED, layout), nproc=nproc), log) == 0, tail(log)
        losses = step_losses(out)
        print(f"{name}: {losses}")
        if name == "plain":
            # At init the logits are near uniform whatever a token sees; once trained, the mask shows.
            assert all(abs(losses[step] - reference[step]) > 1e-3 for step in (2, 3, 4)), "the mask changes the loss"
        else:
            assert losses == pytest.approx(reference, rel=1e-5), name
    # TP=2 on the logits too: the tp2 run's sharded engine against one process given its joined weights.
    ckpt = checkpoint(tmp_path / "tp2", 4)
    weights = checkpoint_weights(ckpt)
    ids = val_windows(short_docs_dir, weights.config.model.seq_len, weights.config.train.seed, 2)[:, :-1]
    sharded = run_distributed(tensor_parallel_logits, 2, str(ckpt), ids)[0]
    one = weights.load_into(build_model(weights.config.model)).eval()
    document_mask.enable(one, read_manifest(short_docs_dir)["eos_token_id"])
    with torch.no_grad():
        whole = one(ids)
        one.document_mask = None
        plain = one(ids)
    print(f"max |TP=2 - one process| masked logits: {(sharded - whole).abs().max().item():.2e}; against the "
          f"unmasked model: {(sharded - plain).abs().max().item():.2e}")
    torch.testing.assert_close(sharded, whole, rtol=0, atol=1e-5)
    assert (sharded - plain).abs().max() > 1e-2


def val_windows(shard_dir: Path, seq_len: int, seed: int, count: int) -> torch.Tensor:
    loader = TokenLoader([(str(shard_dir), 1.0)], "val", seq_len, 1, 0, 1, seed)
    return torch.stack([torch.from_numpy(loader.window(g)) for g in range(count)])  # (count, seq_len + 1)


@pytest.mark.slow
def test_export_given_restarting_positions_gives_the_masked_runs_logits_and_val_loss(masked_run, short_docs_dir,
                                                                                     tmp_path):
    from transformers import AutoModelForCausalLM

    from dist_train.tools.evaluate import evaluate
    from dist_train.tools.export import export

    weights = checkpoint_weights(checkpoint(masked_run, 4))
    cfg = weights.config
    eos = read_manifest(short_docs_dir)["eos_token_id"]
    windows = val_windows(short_docs_dir, cfg.model.seq_len, cfg.train.seed, 4)
    assert (windows == eos).sum() >= 8, "several documents per window"
    ids, targets = windows[:, :-1], windows[:, 1:]
    ours = weights.load_into(build_model(cfg.model)).eval()
    document_mask.enable(ours, eos)
    hf = AutoModelForCausalLM.from_pretrained(export(weights, tmp_path / "hf")).eval()
    positions = document_positions(document_ids(ids, eos))
    with torch.no_grad():
        logits = ours(ids)
        hf_logits = hf(ids, position_ids=positions, use_cache=False).logits
        hf_plain = hf(ids, use_cache=False).logits
    print(f"max |HF - ours| logits: {(hf_logits - logits).abs().max().item():.2e}; "
          f"HF without positions: {(hf_plain - logits).abs().max().item():.2e}")
    torch.testing.assert_close(hf_logits, logits, rtol=0, atol=1e-5)
    assert (hf_plain - logits).abs().max() > 1e-2
    hf_loss = F.cross_entropy(hf_logits.flatten(0, 1).double(), targets.flatten()).item()
    val_loss = evaluate([weights], 4, 2, 1000, torch.device("cpu"))["rows"][0]["val_loss"]
    print(f"evaluate: {val_loss:.8f}, HF export: {hf_loss:.8f}")
    assert abs(val_loss - hf_loss) < 1e-5
    unmasked = checkpoint_weights(checkpoint(masked_run, 4))
    unmasked.config.data.document_mask = False
    assert abs(evaluate([unmasked], 4, 2, 1000, torch.device("cpu"))["rows"][0]["val_loss"] - val_loss) > 1e-4
