"""`python -m dist_train.plot`: curves of several runs from their metrics.jsonl, one valid PNG."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from distributed_helpers import REPO, cpu_env

from dist_train.monitor import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int, lr: float, loss0: float) -> None:
    """A run folder as the trainer writes it: a train line per step, a val line every 5 steps."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": loss0 / step ** 0.3, "lr": lr * min(1.0, step / 5),
                      "grad_norm": 1.0, "tokens": 2048 * step, "tokens_per_s": 5000.0 + step, "mfu": None,
                      "mem_gib": 0.5, "mem_reserved_gib": 0.6, "skipped_steps": 0})
        if step % 5 == 0:
            lines.append({"step": step, "tokens": 2048 * step, "val_loss": loss0 / step ** 0.25,
                          "val_ppl": 3.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_train.plot", *args], check=False, cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_plot_draws_several_runs_into_one_valid_png(tmp_path: Path) -> None:
    write_run(tmp_path / "small", steps=20, lr=3e-3, loss0=7.0)
    write_run(tmp_path / "large", steps=30, lr=1e-3, loss0=6.5)
    out = tmp_path / "figs" / "curves.png"

    proc = run_plot(str(tmp_path / "small"), str(tmp_path / "large"), "--out", str(out))

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out.resolve()}"
    assert png_size(out) == (1500, 450)  # figsize (15, 4.5) at 100 dpi
    assert out.stat().st_size > 20_000  # three panels of curves, not an empty canvas
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (450, 1500)
    assert pixels[..., :3].std() > 0.05  # something was drawn


def test_plot_json_output_names_the_file(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "run", steps=10, lr=1e-3, loss0=5.0)
    out = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "run"), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out.resolve()), "runs": [str(tmp_path / "run")]}
    assert png_size(out) == (1500, 450)


def test_plot_places_validation_points_at_their_tokens_even_without_a_tokens_field(tmp_path: Path) -> None:
    write_run(tmp_path / "run", steps=10, lr=1e-3, loss0=5.0)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "val_loss" in r:
            del r["tokens"]  # eval lines written before they carried tokens
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = plot.load_run(tmp_path / "run")
    assert plot._val_tokens(run["train"], run["val"]) == pytest.approx([2048 * 5, 2048 * 10])


def test_plot_names_the_folder_without_metrics(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "good", steps=5, lr=1e-3, loss0=5.0)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "good"), str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'empty'} has no metrics.jsonl" in capsys.readouterr().err
    assert not out.exists()


def test_plot_reads_a_run_whose_last_line_was_cut_by_a_kill_as_resume_does(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "run", steps=10, lr=1e-3, loss0=5.0)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss": 4.1, "l')  # the kill came mid-write
    out = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "run"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert [r["step"] for r in plot.load_run(tmp_path / "run")["train"]] == list(range(1, 11))
    assert png_size(out) == (1500, 450)
