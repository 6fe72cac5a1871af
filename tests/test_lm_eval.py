"""Downstream evaluation with EleutherAI's lm-evaluation-harness: `dist_train.evaluate --tasks` against
`lm_eval --model hf` on the HF export of the same checkpoint, and `eval.tasks` during a 2-process training run.

Offline: the two tasks shipped in configs/eval (made from the corpus), and a hub task with the hub switched off
to stand for a task that cannot run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import REPO, cpu_env, launch_training
from resume_helpers import STEPS, TINY, overrides, shared_run

from dist_train.monitor import wandb_reader

pytestmark = pytest.mark.slow

SHIPPED = REPO / "configs" / "eval"
TASKS = "shakespeare_next_line,shakespeare_ppl"
LIMIT = "12"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=cpu_env(OFFLINE), capture_output=True, text=True,
                          timeout=timeout)
    return proc


def lm_eval_hf_samples(export: Path, out: Path) -> tuple[dict, dict[str, dict[int, list[float]]]]:
    """Results and per-sample log-likelihoods of `lm_eval --model hf` on an export (as users run it)."""
    proc = run_cli(["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
                    "--device", "cpu", "--tasks", TASKS, "--include_path", str(SHIPPED), "--limit", LIMIT,
                    "--batch_size", "4", "--log_samples", "--output_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for task in TASKS.split(","):
        rows = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        samples[task] = {row["doc_id"]: log_likelihoods(row) for row in rows}
    return results, samples


def log_likelihoods(sample: dict) -> list[float]:
    """One float per request of a document: each choice's log-likelihood, or the text's rolling one."""
    return [float(r[0]) if isinstance(r, list) else float(r) for r in sample["filtered_resps"]]


def metrics(results: dict) -> dict[str, float]:
    return {f"{task}/{key}": value for task, values in results["results"].items() for key, value in values.items()
            if "," in key and "stderr" not in key}


def test_evaluate_tasks_gives_lm_eval_hf_log_likelihoods_and_metrics_on_the_export(tmp_path_factory, shard_dir,
                                                                                   tmp_path):
    run_dir = shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")
    export = tmp_path / "export"
    exported = run_cli(["-m", "dist_train.export", "--run", str(run_dir), "--out", str(export)])
    assert exported.returncode == 0, exported.stderr[-3000:]

    ours_json = tmp_path / "ours.json"
    ours = run_cli(["-m", "dist_train.evaluate", "--run", str(run_dir), "--tasks", TASKS, "--include-path",
                    str(SHIPPED), "--limit", LIMIT, "--batch-size", "5", "--output", str(ours_json), "--log-samples"])
    assert ours.returncode == 0, ours.stderr[-4000:]
    assert "|shakespeare_next_line|" in ours.stdout and "word_perplexity" in ours.stdout  # lm-eval's table
    report = json.loads(ours_json.read_text())
    theirs_results, theirs = lm_eval_hf_samples(export, tmp_path / "lm_eval_hf")

    for task in TASKS.split(","):
        rows = report["samples"][task]
        assert len(rows) == int(LIMIT) and set(theirs[task]) == {row["doc_id"] for row in rows}
        for row in rows:
            assert log_likelihoods(row) == pytest.approx(theirs[task][row["doc_id"]], abs=1e-4), (task, row["doc_id"])
    expected = metrics(theirs_results)
    assert set(metrics(report)) == set(expected)
    for key, value in metrics(report).items():
        assert value == pytest.approx(expected[key], rel=1e-6), key
    assert report["dist_train"]["step"] == STEPS
    acc = report["dist_train"]["metrics"]["eval/shakespeare_next_line/acc"]
    assert acc == expected["shakespeare_next_line/acc,none"]


def test_generation_is_greedy_decoding_as_transformers_does_it_on_the_export(tmp_path_factory, shard_dir, tmp_path):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dist_train.checkpoint.weights import open_weights
    from dist_train.tools.downstream import serve
    from dist_train.tools.task_cli import load_run_tokenizer

    run_dir = shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")
    export = tmp_path / "export"
    assert run_cli(["-m", "dist_train.export", "--run", str(run_dir), "--out", str(export)]).returncode == 0
    prompts = ["To be, or not to be, that is the question:\n", "KING LEAR. Meantime we shall express our darker"]
    requests = [Instance("generate_until", {}, (p, {"until": ["THE END"], "max_gen_toks": 24, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    weights = open_weights(run_dir)
    ours = serve(weights, load_run_tokenizer(weights.config), 4, torch.device("cpu")).generate_until(requests)
    hf = HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=1).generate_until(requests)
    assert ours == hf
    assert any(ours), ours  # something was generated (a 6-step model may stop at once on a prompt)


def test_training_logs_task_metrics_at_each_checkpoint_and_skips_a_task_that_fails(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    # arc_easy is a hub task: offline, it cannot load, as on a cluster node without network.
    proc = launch_training(TINY, overrides(shard_dir, run_dir, "checkpoint.every=3", "wandb.enabled=true",
                                           "eval.tasks=[shakespeare_next_line,arc_easy,shakespeare_ppl]",
                                           f"eval.include_path={SHIPPED}", "eval.limit=8"),
                           nproc=2, extra_env=OFFLINE)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval/shakespeare_next_line/acc" in r]
    assert [r["step"] for r in evaluations] == [3, 6]  # each published checkpoint (checkpoint.every=3, 6 steps)
    for r in evaluations:
        assert 0 <= r["eval/shakespeare_next_line/acc"] <= 1 and r["eval/shakespeare_ppl/bits_per_byte"] > 0
        assert r["eval_tasks_s"] > 0 and "loss" not in r  # its own record: the step times exclude it
    failures = [r for r in records if r.get("event") == "eval_task_failed"]
    assert [(r["step"], r["task"]) for r in failures] == [(3, "arc_easy"), (6, "arc_easy")]
    assert "arc_easy" in proc.stderr and "skipped" in proc.stderr

    history = wandb_reader.read_run_file(wandb_reader.run_files(run_dir)[0]).history
    logged = [row for row in history if "eval/shakespeare_ppl/word_perplexity" in row]
    assert [row["_step"] for row in logged] == [3, 6]
    assert logged[-1]["eval/shakespeare_next_line/acc"] == evaluations[-1]["eval/shakespeare_next_line/acc"]


def test_unknown_task_is_refused_at_start_naming_it_and_the_closest(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch_training(TINY, overrides(shard_dir, run_dir, "eval.tasks=[shakespeare_next_lin]",
                                           f"eval.include_path={SHIPPED}"), nproc=1, launcher="python")
    assert proc.returncode == 2
    assert "eval.tasks: unknown lm-eval task 'shakespeare_next_lin' (closest: shakespeare_next_line" in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


def test_evaluate_tasks_refuses_an_unknown_task_and_reports_one_that_cannot_run(tmp_path_factory, shard_dir):
    run_dir = shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")
    unknown = run_cli(["-m", "dist_train.evaluate", "--run", str(run_dir), "--tasks", "hellaswag,shakespeare_pp",
                       "--include-path", str(SHIPPED)])
    assert unknown.returncode == 2 and "unknown lm-eval task 'shakespeare_pp'" in unknown.stderr
    offline = run_cli(["-m", "dist_train.evaluate", "--run", str(run_dir), "--tasks", "arc_easy,shakespeare_ppl",
                       "--include-path", str(SHIPPED), "--limit", "2", "--json"])
    assert offline.returncode == 1, offline.stderr[-3000:]  # what could run ran; the exit code says one did not
    assert "task arc_easy skipped" in offline.stderr
    assert set(json.loads(offline.stdout)["dist_train"]["metrics"]) == {
        "eval/shakespeare_ppl/word_perplexity", "eval/shakespeare_ppl/byte_perplexity",
        "eval/shakespeare_ppl/bits_per_byte"}


def test_evaluate_tasks_runs_a_group_and_a_task_given_together(tmp_path_factory, shard_dir, tmp_path):
    """A group (loaded once, then handed to lm-eval as loaded) beside a plain task, evaluated together."""
    run_dir = shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")
    include = tmp_path / "tasks"
    shutil.copytree(SHIPPED, include)
    (include / "shakespeare_group.yaml").write_text(
        "group: shakespeare_group\ntask:\n  - shakespeare_next_line\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    proc = run_cli(["-m", "dist_train.evaluate", "--run", str(run_dir), "--tasks", "shakespeare_group,shakespeare_ppl",
                    "--include-path", str(include), "--limit", "2", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating each alone" not in proc.stderr, "the tasks ran together, as loaded"
    results = json.loads(proc.stdout)
    assert {"shakespeare_group", "shakespeare_next_line", "shakespeare_ppl"} <= set(results["results"])
    metrics = results["dist_train"]["metrics"]
    assert metrics["eval/shakespeare_group/acc"] == metrics["eval/shakespeare_next_line/acc"]  # its one task


@pytest.mark.parametrize("extra,message", [
    (["model.arch=encoder_decoder"], "eval.tasks serves decoder-only models to lm-eval"),
    (["eval.every=5", "checkpoint.every=2"], "eval.every (5) must be a multiple of checkpoint.every (2)"),
    (["checkpoint.every=0"], "eval.tasks evaluates published checkpoints: set checkpoint.every"),
    (["eval.include_path=/no/such/folder"], "eval.include_path: /no/such/folder is not a folder"),
])
def test_eval_tasks_config_is_refused_at_load_naming_the_key(extra, message):
    from dist_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, ["eval.tasks=[shakespeare_ppl]", *extra])


def test_shipped_tasks_are_what_data_prep_makes_from_the_held_out_documents(corpus_file, tmp_path):
    from data_prep.encode import in_val_split
    from data_prep.eval_tasks import SPLIT_SEED, VAL_FRACTION, main

    assert main(["--corpus", str(corpus_file), "--out", str(tmp_path)]) == 0
    for name in ("shakespeare_next_line.jsonl", "shakespeare_ppl.jsonl"):
        assert (tmp_path / name).read_text() == (SHIPPED / name).read_text(), name
    held_out = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    held_out = "\n".join(t for t in held_out if in_val_split(t, SPLIT_SEED, VAL_FRACTION))
    items = [json.loads(line) for line in (SHIPPED / "shakespeare_next_line.jsonl").read_text().splitlines()]
    assert len(items) == 200 and {item["label"] for item in items} == {0, 1, 2, 3}
    for item in items:  # the passage and its true next line come from the held-out documents
        assert all(line in held_out for line in [*item["context"].splitlines(), item["choices"][item["label"]]])


def test_evaluate_tasks_refuses_an_encoder_decoder_with_the_seq2seq_route():
    from argparse import Namespace
    from types import SimpleNamespace

    from dist_train.config import load_config
    from dist_train.tools.task_cli import _refusal

    t5 = SimpleNamespace(config=load_config(REPO / "configs" / "t5-tiny.yaml", []))
    args = Namespace(include_path=None, num_fewshot=None, limit=None, bootstrap_iters=0)
    assert "backend=seq2seq" in _refusal(args, [t5])
    decoder = SimpleNamespace(config=load_config(TINY, []))
    assert _refusal(args, [decoder]) is None
    assert "one set of weights" in _refusal(args, [decoder, decoder])
