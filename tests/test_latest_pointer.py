"""A `checkpoints/latest` that holds anything but a `step_NNNNNNNN` name (empty, an absolute path, `../x`) is a
broken pointer: it is said so, nothing it names is read, moved or deleted, nothing outside `checkpoints/` changes,
and the run resumes from the newest `step_*` that verifies (corrupt ones moved to `checkpoints/corrupt/` only).

The checkpoints are those of a real run, trained once (the 2-process ZeRO-2 reference shared with test_resume and
test_checkpoint_integrity); one real resumed training shows the whole path end to end."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from resume_helpers import assert_same_end, checkpoint, command, overrides, run, shared_run, tail

from dist_train.checkpoint.layout import resolve_checkpoint
from dist_train.checkpoint.resume import check_before_launch, find_checkpoint, resume_target
from dist_train.checkpoint.verify import CorruptCheckpoint
from dist_train.config import ConfigError, load_config
from dist_train.distributed.environment import ProcessPlace

pytestmark = pytest.mark.slow  # the checkpoints come from a real 2-process training

ZERO2 = ("deepspeed.zero_stage=2",)
PLACE = ProcessPlace(rank=0, local_rank=0, world_size=1, host="test", slurm_node=None, slurm_job_id=None,
                     slurm_restart_count=0)
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_dir):
    """2 processes, ZeRO-2, 6 steps, checkpoints at steps 2, 4 and 6, never interrupted."""
    return shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, *ZERO2)


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), and every folder (-> "dir"): a move or an edit shows."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def world_with_a_run(tmp_path: Path, reference: Path) -> Path:
    """tmp_path/runs/run/checkpoints: the reference's checkpoints (steps 2, 4, 6); around them a user's files that
    a broken `latest` could name: RUN/x/ (`../x` from checkpoints/), RUN/notes.txt, and a folder outside the run."""
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    (run_dir / "notes.txt").write_text("mine\n")
    for folder in (run_dir / "x", tmp_path / "elsewhere" / "data", tmp_path / "runs" / "sibling"):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text(f"{folder.name}\n")
    return run_dir


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


POINTERS = {"empty": "", "absolute": "{tmp}/elsewhere/data", "dotdot": "../x", "dotdot_sibling": "../../sibling",
            "through_a_step": "step_00000004/../../x", "unpadded": "step_6"}


@pytest.mark.parametrize("kind", POINTERS)
def test_a_broken_latest_touches_nothing_and_resumes_the_newest_good_step(reference, tmp_path, capsys, kind):
    run_dir = world_with_a_run(tmp_path, reference)
    latest = run_dir / "checkpoints" / "latest"
    pointer = POINTERS[kind].format(tmp=tmp_path)
    latest.write_text(pointer + "\n")
    before = tree_hashes(tmp_path)

    events = []
    found = find_checkpoint(run_dir, "latest", PLACE, "full", events)

    assert found == checkpoint(run_dir, 6)
    assert events == [{"event": "broken_latest", "latest": pointer}]
    err = capsys.readouterr().err
    print(err)
    assert f"warning: {latest} holds {pointer!r}, not the name of a checkpoint folder" in err
    assert "a broken pointer; ignored (nothing it names is read, moved or deleted)" in err
    after = tree_hashes(tmp_path)
    key = "runs/run/checkpoints/latest"
    assert latest.read_text() == "step_00000006\n", "the pointer is repaired"
    assert {k: v for k, v in after.items() if k != key} == {k: v for k, v in before.items() if k != key}


def test_a_broken_latest_with_a_corrupt_newest_step_moves_only_that_step_into_checkpoints_corrupt(
        reference, tmp_path, capsys):
    run_dir = world_with_a_run(tmp_path, reference)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest").write_text(f"{tmp_path / 'elsewhere' / 'data'}\n")
    flip_byte(checkpoint(run_dir, 6) / SHARD)
    before = tree_hashes(tmp_path)

    events = []
    assert find_checkpoint(run_dir, "latest", PLACE, "full", events) == checkpoint(run_dir, 4)

    corrupt = checkpoints / "corrupt" / "step_00000006"
    assert [e["event"] for e in events] == ["broken_latest", "corrupt_checkpoint"]
    assert events[1]["moved_to"] == str(corrupt)
    assert f"moved to {corrupt}; it will not be loaded" in capsys.readouterr().err
    after = tree_hashes(tmp_path)
    moved = {k.replace("checkpoints/step_00000006", "checkpoints/corrupt/step_00000006"): v
             for k, v in before.items() if "checkpoints/step_00000006" in k}
    expected = {k: v for k, v in before.items() if "checkpoints/step_00000006" not in k}
    expected |= moved | {"runs/run/checkpoints/corrupt": "dir",
                         "runs/run/checkpoints/latest": after["runs/run/checkpoints/latest"]}
    assert after == expected, "only step_00000006 moved, into checkpoints/corrupt/, and latest was rewritten"
    assert (checkpoints / "latest").read_text() == "step_00000004\n"


def test_a_broken_latest_and_no_checkpoint_folder_is_refused_naming_the_way_out(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("/etc\n")
    with pytest.raises(CorruptCheckpoint, match=r"holds '/etc', not the name of a checkpoint folder .* a broken "
                                                r"pointer, and there is no checkpoint folder to resume from instead"):
        find_checkpoint(tmp_path / "run", "latest", PLACE, "full", [])
    assert (checkpoints / "latest").read_text() == "/etc\n"


def test_readers_before_launch_and_the_tools_never_follow_a_broken_latest(reference, tmp_path, shard_dir):
    """The pre-launch check reads the newest complete step instead; `--resume none` still sees checkpoints; export,
    evaluate and average (resolve_checkpoint) refuse, naming the pointer and the steps to pass with --step."""
    run_dir = world_with_a_run(tmp_path, reference)
    (run_dir / "checkpoints" / "latest").write_text("../x\n")
    assert resume_target(run_dir, "latest") == checkpoint(run_dir, 6)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml",
                      overrides(shard_dir, run_dir, *ZERO2))
    assert check_before_launch(run_dir, cfg, "latest", 2) is None, "not finished: `latest` does not name step 6"
    with pytest.raises(ConfigError, match="already holds checkpoints .its latest is a broken pointer."):
        resume_target(run_dir, "none")
    with pytest.raises(FileNotFoundError, match=r"holds '../x', not the name of a checkpoint folder .*: a broken "
                                                r"pointer; pass --step N, one of the complete checkpoints of .*: "
                                                r"steps \[2, 4, 6\]"):
        resolve_checkpoint(run_dir)


def test_resuming_past_an_absolute_latest_trains_to_the_uninterrupted_end(reference, shard_dir, tmp_path):
    """The reference run, copied without its summary.json, with step 6 corrupt and `latest` holding the absolute
    path of a folder next to the run: the same command says so, sets step 6 aside, resumes from step 4 and ends
    bit-identical to the uninterrupted run; the folder `latest` named is untouched."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()
    outside = tmp_path / "user_data"
    outside.mkdir()
    (outside / "corpus.txt").write_text("not a checkpoint\n")
    (run_dir / "checkpoints" / "latest").write_text(f"{outside}\n")
    flip_byte(checkpoint(run_dir, 6) / SHARD)
    before = tree_hashes(outside)

    log = tmp_path / "train.log"
    assert run(command(overrides(shard_dir, run_dir, *ZERO2), nproc=2), log) == 0, tail(log)
    text = log.read_text()
    assert f"holds {str(outside)!r}, not the name of a checkpoint folder" in text
    assert f"moved to {run_dir / 'checkpoints' / 'corrupt' / 'step_00000006'}" in text
    assert f"resumed from {checkpoint(run_dir, 4)} at step 4" in text
    assert tree_hashes(outside) == before and not (tmp_path / "corrupt").exists()
    assert_same_end(run_dir, reference)
