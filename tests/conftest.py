"""One real local Ray cluster for the whole test session (a head with its dashboard, token auth on).

Tests that need extra nodes call `ray_cluster.add_node(...)` and remove them by process id; CLI
subprocesses join the same cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.local_cluster import AUTH_ENV, LocalCluster

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.update(AUTH_ENV)
    cluster = LocalCluster.start(num_cpus=8, dashboard=True)
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        cluster.down()


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    assert SHAKESPEARE.is_file(), f"missing test corpus {SHAKESPEARE}"
    return SHAKESPEARE
