"""`python -m launch.slurm prep` on the two-node test cluster: a real SLURM array of data_prep.shard tasks and a
merge job after it, compared with a local one-task run of the same inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from slurm_helpers import ACTIVE_STATES, Cluster, job_env, slurm_cli, tail

from data_prep.shard import shard_corpus
from dist_train.formats.manifest import read_manifest
from launch.slurm import _call, job_status

pytestmark = pytest.mark.slow
SHARD_OPTIONS = ["--val-fraction", "0.1", "--seed", "0", "--shard-tokens", "50000"]


def stream(folder: Path, split: str) -> bytes:
    manifest = read_manifest(folder)
    return b"".join((folder / s["path"]).read_bytes() for s in manifest["splits"][split]["shards"])


def prep(corpus: Path, tokenizer: Path, out: Path) -> dict:
    proc = slurm_cli("prep", "--tasks", "4", "--nodes", "2", "--input", str(corpus), "--tokenizer", str(tokenizer),
                     "--out", str(out), *SHARD_OPTIONS, "--json", env=job_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def array_elements(array_id: str) -> dict[int, dict]:
    """Every element of an array job: task id → scontrol fields."""
    out = _call("scontrol", "show", "job", "-o", array_id)
    from launch.slurm import parse_scontrol_line

    elements = {}
    for line in out.splitlines():
        fields = parse_scontrol_line(line)
        if fields.get("ArrayTaskId", "").isdigit():
            elements[int(fields["ArrayTaskId"])] = fields
    return elements


def wait_for_array(cluster: Cluster, array_id: str, tasks: set[int], log: Path, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        elements = array_elements(array_id)
        if set(elements) == tasks and all(e["JobState"] not in ACTIVE_STATES for e in elements.values()):
            return elements
        time.sleep(1)
    pytest.fail(f"array {array_id} did not end within {timeout_s:.0f} s: {array_elements(array_id)}\n{tail(log)}")


@pytest.fixture(scope="module")
def local_one_task(corpus_file, tokenizer_dir, tmp_path_factory, datasets_cache) -> Path:
    out = tmp_path_factory.mktemp("prep_local") / "one"
    shard_corpus([str(corpus_file)], str(tokenizer_dir), str(out), val_fraction=0.1, seed=0, shard_tokens=50_000,
                 cache_dir=str(datasets_cache), progress=False)
    return out


def test_prep_array_of_4_tasks_then_merge_equals_a_local_one_task_run(slurm_cluster, corpus_file, tokenizer_dir,
                                                                      local_one_task, tmp_path):
    out = tmp_path / "shards"
    submitted = prep(corpus_file, tokenizer_dir, out)
    assert submitted["submitted_tasks"] == [0, 1, 2, 3]
    merge_log = Path(submitted["merge_log"])
    elements = wait_for_array(slurm_cluster, submitted["array_job_id"], {0, 1, 2, 3}, merge_log)
    assert {e["JobState"] for e in elements.values()} == {"COMPLETED"}
    assert len({e["NodeList"] for e in elements.values()}) == 2  # the tasks ran on both nodes
    merge = slurm_cluster.wait_for_end(submitted["merge_job_id"], merge_log)
    assert merge["state"] == "COMPLETED", tail(merge_log)
    assert merge["fields"]["StartTime"] >= max(e["EndTime"] for e in elements.values())  # after the array
    for split in ("train", "val"):
        assert stream(out, split) == stream(local_one_task, split)
    assert read_manifest(out)["prep"]["num_tasks"] == 4


def test_cancelled_task_is_rerun_by_resubmitting_and_finished_ones_are_not(slurm_cluster, corpus_file, tokenizer_dir,
                                                                           local_one_task, tmp_path):
    out = tmp_path / "shards"
    submitted = prep(corpus_file, tokenizer_dir, out)
    array_id, merge_log = submitted["array_job_id"], Path(submitted["merge_log"])
    progress = out / "tasks" / "2" / "progress.json"
    deadline = time.monotonic() + 120
    while not progress.is_file():  # task 2 has started: cancel it mid-way
        assert time.monotonic() < deadline, tail(merge_log)
        time.sleep(0.05)
    _call("scancel", f"{array_id}_2")
    elements = wait_for_array(slurm_cluster, array_id, {0, 1, 2, 3}, merge_log)
    assert elements[2]["JobState"] == "CANCELLED"
    assert not (out / "tasks" / "2" / "manifest.json").exists()
    assert slurm_cluster.wait_for_end(submitted["merge_job_id"], merge_log)["state"] == "CANCELLED"  # invalid dep
    assert not (out / "manifest.json").exists()
    finished = {i: (out / "tasks" / str(i) / "manifest.json").stat().st_mtime_ns for i in (0, 1, 3)}

    again = prep(corpus_file, tokenizer_dir, out)
    assert again["submitted_tasks"] == [2]
    assert set(wait_for_array(slurm_cluster, again["array_job_id"], {2}, merge_log)) == {2}
    merge = slurm_cluster.wait_for_end(again["merge_job_id"], Path(again["merge_log"]))
    assert merge["state"] == "COMPLETED", tail(Path(again["merge_log"]))
    assert {i: (out / "tasks" / str(i) / "manifest.json").stat().st_mtime_ns for i in (0, 1, 3)} == finished
    for split in ("train", "val"):
        assert stream(out, split) == stream(local_one_task, split)
    assert job_status(again["merge_job_id"])["exit_code"] == "0:0"
