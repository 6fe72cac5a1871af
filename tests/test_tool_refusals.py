"""export, average and evaluate never destroy or ship what they should not: `--out` is a new folder or the tool's own
earlier output (a run folder, a checkpoint, a user's folder or file is refused and left byte for byte as it was), a
checkpoint whose files do not match their files.json is refused naming the file, and bad arguments are one-line
refusals with exit code 2, never tracebacks.

One trained run (the session's 2-process ZeRO-2 reference, steps 2, 4, 6) is copied once for this module; every
test reads that copy, and a test that damages a checkpoint damages a copy of its own."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import REPO, cpu_env
from resume_helpers import STEPS, checkpoint, shared_run

from dist_train.tools import average, evaluate, export
from dist_train.tools.output_folder import MARKER

pytestmark = pytest.mark.slow
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
TOOLS = {"export": export.main, "average": average.main, "evaluate": evaluate.main}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shard_dir) -> Path:
    reference = shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, "deepspeed.zero_stage=2")
    copy = tmp_path_factory.mktemp("tool_refusals") / "run"
    shutil.copytree(reference, copy)
    return copy


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 of a file, or "dir"} of everything under `root` (and `root` itself)."""
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in [root, *sorted(root.rglob("*"))]}


def writing_argv(tool: str, run_dir: Path, out: Path) -> list[str]:
    return (["--run", str(run_dir), "--out", str(out)] if tool == "export"
            else ["--run", str(run_dir), "--last", "2", "--out", str(out)])


def refusal(capsys, tool: str) -> str:
    """The tool's one-line refusal on stderr (DeepSpeed may log other lines there)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{tool}: ")]
    assert len(lines) == 1, err
    return lines[0]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["run folder", "checkpoint folder", "folder with a user's file", "file"])
def test_out_naming_a_run_a_checkpoint_or_anything_the_tool_did_not_write_is_refused_and_left_unchanged(
        run_dir, tmp_path, capsys, target):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("compare with the 1B run\n")
    (tmp_path / "model.bin").write_bytes(b"weights of another model")
    out, shown = {"run folder": (run_dir, "checkpoints/"),
                  "checkpoint folder": (checkpoint(run_dir, STEPS), "client_state.json"),
                  "folder with a user's file": (notes, "todo.txt"),
                  "file": (tmp_path / "model.bin", "is a file")}[target]
    before = {**tree(run_dir), **tree(tmp_path)}
    for tool in ("export", "average"):
        assert TOOLS[tool](writing_argv(tool, run_dir, out)) == 2, tool
        message = refusal(capsys, tool)
        print(message)
        assert f"--out: {out} " in message and shown in message and "Nothing was written" in message
    assert {**tree(run_dir), **tree(tmp_path)} == before
    assert not list(tmp_path.glob("*.tmp")) and not list(run_dir.parent.glob("*.tmp"))


def test_the_tools_own_earlier_output_is_replaced_but_not_with_a_users_file_in_it(run_dir, tmp_path, capsys):
    """A second export into the same --out replaces the first (its 5 shards go, one model.safetensors comes); an
    OUT.tmp that a killed export left (its marker says so) is removed; a user's file in the export, an OUT.tmp of
    the user's, or another tool's output make it refuse, changing nothing."""
    out = tmp_path / "hf"
    assert export.main(["--run", str(run_dir), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    killed = tmp_path / "hf.tmp"
    killed.mkdir()
    (killed / MARKER).write_text(json.dumps({"written_by": export.TOOL, "complete": False, "files": []}))
    (killed / "part-00000.safetensors").write_bytes(b"half written")
    assert export.main(["--run", str(run_dir), "--out", str(out)]) == 0
    assert f"removing {killed}, left by an interrupted {export.TOOL}" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not killed.exists()
    listed = json.loads((out / MARKER).read_text())
    assert sorted(listed["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER)

    (out / "README.md").write_text("my model card\n")
    users_tmp = tmp_path / "avg.tmp"
    users_tmp.mkdir()
    (users_tmp / "keep.txt").write_text("mine\n")
    assert average.main(["--run", str(run_dir), "--last", "2", "--out", str(tmp_path / "avg0")]) == 0
    before = tree(tmp_path)
    cases = [(export.main, out, f"--out: {out} holds files {export.TOOL} did not write: README.md"),
             (average.main, tmp_path / "avg", f"the temporary folder of --out: {users_tmp} is a folder that "
                                              f"{average.TOOL} did not write (no {MARKER}); it holds keep.txt"),
             (export.main, tmp_path / "avg0", f"--out: {tmp_path / 'avg0'} holds the output of {average.TOOL}, "
                                              f"not of {export.TOOL}")]
    for main, target, expected in cases:
        tool = "export" if main is export.main else "average"
        assert main(writing_argv(tool, run_dir, target)) == 2
        assert expected in refusal(capsys, tool)
    assert tree(tmp_path) == before
    assert average.main(["--run", str(run_dir), "--last", "1", "--out", str(tmp_path / "avg0")]) == 0
    assert json.loads((tmp_path / "avg0" / "weights.json").read_text())["averaged_steps"] == [STEPS]


def test_a_corrupted_optimizer_file_is_refused_by_export_evaluate_and_average_naming_it(run_dir, tmp_path, capsys):
    """A flipped byte keeps the file's size: the sha256 catches it. --no-verify-hashes skips the hashes (the
    flipped byte gets through) but still compares sizes: a truncated file is refused."""
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    file = checkpoint(damaged, STEPS) / SHARD
    flip_byte(file)
    argv = {"export": ["--run", str(damaged), "--out", str(tmp_path / "hf")],
            "evaluate": ["--run", str(damaged), "--max-samples", "4", "--unigram-tokens", "1000"],
            "average": ["--run", str(damaged), "--last", "2", "--out", str(tmp_path / "avg")]}
    for tool, args in argv.items():
        assert TOOLS[tool](args) == 2, tool
        message = refusal(capsys, tool)
        assert f"refused, the checkpoint {file.parent} is corrupt: {file}: sha256 differs" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing was written"

    file.write_bytes(file.read_bytes()[:-100])
    for tool, args in argv.items():
        assert TOOLS[tool]([*args, "--no-verify-hashes"]) == 2, tool
        assert f"is corrupt: {file}: {file.stat().st_size:,} bytes, but" in refusal(capsys, tool)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("tool", ["evaluate --max-samples 0", "export --max-shard-size 0",
                                  "reshard of a run folder", "reshard of an empty folder"])
def test_bad_arguments_are_one_line_refusals_with_exit_code_2(run_dir, tmp_path, tool):
    argv, expected = {
        "evaluate --max-samples 0": (["dist_train.evaluate", "--run", str(run_dir), "--max-samples", "0"],
                                     "evaluate: --max-samples must be at least 1, not 0"),
        "export --max-shard-size 0": (["dist_train.export", "--run", str(run_dir), "--out", str(tmp_path / "hf"),
                                       "--max-shard-size", "0"],
                                      "export: --max-shard-size must be at least 1 byte, not '0'"),
        "reshard of a run folder": (["dist_train.checkpoint.reshard", "--checkpoint", str(run_dir)],
                                    f"reshard: --checkpoint {run_dir} is no checkpoint folder (it has no "
                                    f"client_state.json, which every published checkpoint holds); pass one of "
                                    f"{run_dir}/checkpoints/{{step_00000002, step_00000004, step_00000006}}"),
        "reshard of an empty folder": (["dist_train.checkpoint.reshard", "--checkpoint", str(tmp_path)],
                                       f"reshard: --checkpoint {tmp_path} is no checkpoint folder"),
    }[tool]
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    print(proc.stderr)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
