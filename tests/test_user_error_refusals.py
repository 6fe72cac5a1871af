"""What an adversarial user gets from a bad config file or a bad number: exit 2 and one line naming the file, line,
key or flag and the fix; never a traceback, a hang or an error message of megabytes. Each case runs the real
command in a fresh process (all of them refuse before any training starts)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from distributed_helpers import REPO, cpu_env

from dist_train.config import ConfigError, load_config
from dist_train.scaling.cli import main as scaling_main

TINY = REPO / "configs" / "tiny.yaml"


def alias_bomb(levels: int) -> str:
    """A "billion laughs" config: `model` is a list that holds the list of the level below 9 times (once by
    itself, 8 times by alias), so it expands to 9**levels strings (7 levels: 295 bytes, 4.8 M strings)."""
    nested = '&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, levels):
        nested = f"&a{i} [{nested},{','.join([f'*a{i - 1}'] * 8)}]"
    return f"model: {nested}\n"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def scaling(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dist_train.scaling", *argv]


def plan(*argv: str) -> Callable[[Path, Callable[[str], Path]], list[str]]:
    return lambda t, fx: scaling("plan", *argv)


def count(config: Path, *overrides: str) -> list[str]:
    return scaling("count", "--config", str(config), *overrides)


def broken_line_run(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    write(run / "metrics.jsonl", '{"step": 1, "loss": 5.0, "tokens": 64, "lr": 0.001, "tokens_per_s": 9.0}\n'
                                 '{"step": 2, "lo\n{"step": 3, "loss": 4.0, "tokens": 192, "lr": 0.001}\n')
    return run


WANDB_READER = [sys.executable, "-m", "dist_train.monitor.wandb_reader"]
SOURCES_1E308 = "data.sources=[{path: a, weight: 1e308}, {path: b, weight: 1e308}]"

# id -> (command line from a temporary folder and a fixture getter (the shared shard folder where a case gets as far
# as the data on today's code), what the one line of stderr must say)
CASES: dict[str, tuple[Callable[[Path, Callable[[str], Path]], list[str]], str]] = {
    "yaml key given twice": (
        lambda t, fx: count(write(t / "c.yaml", "model:\n  n_layers: 2\ntrain:\n  lr: 1e-3\nmodel:\n  d_model: 8\n")),
        "c.yaml, line 5, column 1: key 'model' is given twice in one mapping, on line 1 and line 5; the second "
        "would silently replace the first"),
    "yaml alias bomb of 7 levels": (
        lambda t, fx: count(write(t / "c.yaml", alias_bomb(7))),
        "c.yaml, line 1, column 13: with its aliases (*name) expanded this holds more than 100,000 values"),
    "yaml alias bomb of 9 levels": (
        lambda t, fx: count(write(t / "c.yaml", alias_bomb(9))),
        "c.yaml, line 1, column 23: with its aliases (*name) expanded this holds more than 100,000 values"),
    "yaml alias of a large list quoted in the error": (
        lambda t, fx: count(write(t / "c.yaml", alias_bomb(4))),
        "c.yaml: model: expected a mapping of ModelConfig fields, got [[[...], [...], [...], [...], ...], "),
    "yaml not utf-8": (
        lambda t, fx: count(write(t / "c.yaml", "model:\n  n_layers: 2\n# caf\xe9\n".encode("latin-1"))),
        "c.yaml, line 3 is not UTF-8 text (byte 0xe9): save it as UTF-8"),
    "yaml nested 5000 deep": (
        lambda t, fx: count(write(t / "c.yaml", "model: " + "[" * 5000 + "]" * 5000 + "\n")),
        "c.yaml, line 1, column 39: nested deeper than 32 levels"),
    "mixture weights that sum to inf": (
        lambda t, fx: count(TINY, "data.path=null", SOURCES_1E308),
        f"override {SOURCES_1E308}: data.sources weights add up to more than the largest float (the sum is inf)"),
    "plan --compute 0": (plan("--compute", "0"), "--compute must be a positive number, got 0"),
    "plan --params 0": (plan("--params", "0"), "--params must be a positive number, got 0"),
    "plan --compute -1": (plan("--compute", "-1"), "--compute must be a positive number, got -1"),
    "plan --params nan": (plan("--params", "nan"), "--params must be a positive number, got nan"),
    "plan --tokens 1e300": (plan("--tokens", "1e300"),
                            "tokens 1e+300: the compute-optimal allocation of this budget overflows a float"),
    "plan --write-config onto its --config": (
        lambda t, fx: scaling("plan", "--compute", "1e18", "--config", str(write(t / "c.yaml", TINY.read_text())),
                              "--write-config", str(t / "." / "c.yaml"), f"data.path={fx('shard_dir')}"),
        "c.yaml is the --config it plans from, which it would overwrite: write the plan to a new file"),
    "plot of a metrics.jsonl with a broken line inside": (
        lambda t, fx: [sys.executable, "-m", "dist_train.plot", str(broken_line_run(t)), "--out", str(t / "p.png")],
        "metrics.jsonl, line 2 is not a JSON object: '{\"step\": 2, \"lo'"),
    "wandb_reader of a file that is not one": (
        lambda t, fx: [*WANDB_READER, str(write(t / "run-x.wandb", "hello"))],
        "run-x.wandb is not a W&B run file (it starts b'hello', not :W&B and 0xBEE1)"),
    "wandb_reader of a folder without runs": (
        lambda t, fx: [*WANDB_READER, str(t)],
        "no run-*.wandb files under"),
    "run_local.sh 0": (
        lambda t, fx: ["bash", str(REPO / "launch" / "run_local.sh"), "0", "--config", str(TINY),
                       f"data.path={fx('shard_dir')}", f"run.out_dir={t / 'run'}"],
        "run_local.sh: the first argument is the number of processes, got '0': give a whole number >= 1"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_user_error_exits_2_with_one_line_that_names_it_and_changes_no_file(case: str, tmp_path: Path,
                                                                              request: pytest.FixtureRequest) -> None:
    command, expected = CASES[case]
    argv = command(tmp_path, request.getfixturevalue)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = subprocess.run(argv, cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in lines[0]
    assert len(lines[0]) < 400  # a quoted value is shortened, whatever its size
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("overrides", [["model.d_model=1000000000"],
                                       ["model.d_model=1000000001"],
                                       ["model.d_model=999999999", "model.n_heads=1000000000"]])
def test_a_huge_d_model_is_checked_in_milliseconds(overrides: list[str]) -> None:
    """The check's suggestion (the divisor nearest n_heads) was searched for on every load, one trial division
    per value up to d_model: a billion of them."""
    start = time.perf_counter()
    try:
        load_config(TINY, ["data.path=x", *overrides])
    except ConfigError as e:
        assert "must be divisible by model.n_heads" in str(e)
        suggested = int(str(e).rsplit("model.n_heads=", 1)[1])
        assert int(overrides[0].split("=")[1]) % suggested == 0
    assert time.perf_counter() - start < 2.0


def test_sizing_a_huge_d_model_answers_within_2_s(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    assert scaling_main(["count", "--config", str(TINY), "model.d_model=1000000000", "--json"]) == 0
    assert time.perf_counter() - start < 2.0
    assert json.loads(capsys.readouterr().out)["total"] > 1e9


def test_yaml_merge_keys_still_override_the_merged_values(tmp_path: Path) -> None:
    """`<<: *base` followed by a key of base is YAML's way to override, not a key given twice."""
    config = write(tmp_path / "c.yaml", "model:\n  <<: &base {n_layers: 2, d_model: 64}\n  n_layers: 3\n"
                                        "data:\n  path: x\n")
    cfg = load_config(config)
    assert (cfg.model.n_layers, cfg.model.d_model) == (3, 64)
