"""A real SLURM cluster for the tests in this folder: slurmctld plus two slurmd ("node1", "node2") on this
machine, started once per session by `tests/slurm/cluster.sh` and stopped at the end, failures included.

The script installs SLURM when it is missing (Debian's slurm-wlm; needs root), so a fresh CI machine needs
nothing beforehand; `tests/slurm/cluster.sh install` does only that step.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from slurm_helpers import CLUSTER_SH, NODES, Cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir = tmp_path_factory.mktemp("slurm_cluster")
    start = subprocess.run(["bash", str(CLUSTER_SH), "start", str(state_dir), str(len(NODES))],
                           capture_output=True, text=True, check=False)
    if start.returncode != 0:
        pytest.fail(f"could not start the test SLURM cluster:\n{start.stdout}\n{start.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state_dir / "slurm.conf")
    try:
        yield Cluster(state_dir=state_dir, conf=state_dir / "slurm.conf")
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(state_dir)], check=False)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
