"""dist_train.monitor.wandb_reader reads back what real `wandb` (offline) wrote: rows, summary, config, resumes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wandb  # noqa: F401 - a dependency: its absence must fail these tests, not skip them
from distributed_helpers import REPO, cpu_env

from dist_train.monitor import wandb_reader

pytestmark = pytest.mark.slow  # each test runs real wandb in fresh processes

WRITER = """
import json, sys, wandb
spec = json.loads(sys.argv[1])
wandb.setup(settings=wandb.Settings(mode="offline", silent=True))
run = wandb.init(project="reader-test", dir=spec["dir"], id=spec["id"], name="reader", resume="allow",
                 mode="offline", config=spec["config"], tags=["t1"], settings=wandb.Settings(silent=True))
for step, row in spec["rows"]:
    run.log(row, step=step)
run.summary.update(spec["summary"])
run.finish()
"""


def write_offline_run(root: Path, run_id: str, rows: list[tuple[int, dict]], config: dict | None = None,
                      summary: dict | None = None) -> Path:
    """Run real wandb (offline) in a fresh process; return the `.wandb` file it wrote."""
    before = set(root.glob("wandb/*run-*/run-*.wandb"))
    spec = {"dir": str(root), "id": run_id, "rows": rows, "config": config or {}, "summary": summary or {}}
    proc = subprocess.run([sys.executable, "-c", WRITER, json.dumps(spec)], check=False, cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (new,) = set(root.glob("wandb/*run-*/run-*.wandb")) - before
    return new


def user_keys(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def test_reader_returns_exactly_the_rows_summary_and_config_wandb_logged(tmp_path: Path) -> None:
    rows = [(s, {"loss": 1.0 / s, "lr": 1e-3, "mfu": None, "rank/0": 7}) for s in range(1, 6)]
    rows.insert(4, (4, {"val_loss": 2.5}))  # merges into step 4's row, as an eval after a log step does
    rows.append((9, {"loss": float("nan")}))
    big = "x" * 70_000  # a config record of >2 blocks: split into first/middle/last pieces
    path = write_offline_run(tmp_path, "abc123", rows, config={"model": {"n_layers": 2}, "note": big},
                             summary={"final_step": 9, "wall_s": 1.5})

    run = wandb_reader.read_run_file(path)

    assert (run.run_id, run.name, run.project, run.tags) == ("abc123", "reader", "reader-test", ["t1"])
    assert run.config["model"] == {"n_layers": 2} and run.config["note"] == big
    assert [r["_step"] for r in run.history] == [1, 2, 3, 4, 5, 9]
    assert user_keys(run.history[3]) == {"loss": 0.25, "lr": 1e-3, "mfu": None, "rank/0": 7, "val_loss": 2.5}
    assert math.isnan(run.history[-1]["loss"])
    assert run.summary["final_step"] == 9 and run.summary["wall_s"] == 1.5
    assert run.exit_code == 0


def test_a_file_cut_by_a_kill_keeps_its_complete_records_and_corruption_is_refused(tmp_path: Path) -> None:
    path = write_offline_run(tmp_path, "cut1", [(s, {"loss": float(s)}) for s in range(1, 40)])
    data = path.read_bytes()
    whole = wandb_reader.read_run_file(path)

    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) * 2 // 3])
    partial = wandb_reader.read_run_file(cut)
    assert 0 < len(partial.history) < len(whole.history)
    assert partial.history == whole.history[: len(partial.history)]
    assert partial.exit_code is None  # no exit record: the process never finished

    corrupt = tmp_path / "corrupt.wandb"
    corrupt.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(wandb_reader.WandbFileError, match="crc32"):
        wandb_reader.read_run_file(corrupt)

    not_wandb = tmp_path / "x.wandb"
    not_wandb.write_bytes(b"hello, world")
    with pytest.raises(wandb_reader.WandbFileError, match="not a W&B run file"):
        wandb_reader.read_run_file(not_wandb)


def test_resumed_run_files_are_ordered_by_start_time_not_folder_name(tmp_path: Path) -> None:
    first = write_offline_run(tmp_path, "res1", [(1, {"loss": 3.0}), (2, {"loss": 2.0})])
    second = write_offline_run(tmp_path, "res1", [(3, {"loss": 1.5}), (4, {"loss": 1.0})])
    write_offline_run(tmp_path, "other", [(1, {"loss": 9.0})])
    # A resume within the same second gets a folder name that sorts *before* the first: simulate it.
    early_name = tmp_path / "wandb" / "offline-run-20000101_000000-res1"
    shutil.move(second.parent, early_name)

    assert len(wandb_reader.run_files(tmp_path)) == 3  # not the latest-run symlink as a fourth
    files = wandb_reader.run_files(tmp_path, "res1")
    assert [f.parent for f in files] == [first.parent, early_name]
    assert [r["_step"] for r in wandb_reader.read_history(tmp_path, "res1")] == [1, 2, 3, 4]
    assert wandb_reader.last_step(tmp_path, "res1") == 4
    assert wandb_reader.last_step(tmp_path, "never-logged") is None


def test_reader_cli_prints_history_as_json_lines_and_the_summary(tmp_path: Path, capsys) -> None:
    path = write_offline_run(tmp_path, "cli1", [(2, {"loss": 0.5}), (4, {"loss": 0.25})],
                             summary={"tokens": 99})
    assert wandb_reader.main([str(path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["_step"], r["loss"]) for r in rows] == [(2, 0.5), (4, 0.25)]

    assert wandb_reader.main([str(tmp_path), "--summary", "--json"]) == 0
    (summary,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (summary["run_id"], summary["summary"]["tokens"], summary["file"]) == ("cli1", 99, str(path))
