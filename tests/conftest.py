"""One real local Ray cluster for the whole test session (a head with its dashboard, token auth on).

Tests that need extra nodes call `ray_cluster.add_node(...)` and remove them by process id; CLI
subprocesses join the same cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from cluster.local_cluster import AUTH_ENV, LocalCluster
from serve.direct_ingress import direct_ingress_env

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "third_party" / "tinyshakespeare" / "tinyshakespeare.txt"


# Ray reads RAY_AUTH_MODE when it is first imported: set it before any test module imports ray.
os.environ.update(AUTH_ENV)

OWNER_FILE = "raylm-test-owner.json"


def _reap_orphaned_test_clusters() -> None:
    """Stop test clusters whose pytest process died without its teardown (killed by a timeout)."""
    for owner in Path("/tmp").glob(f"rl*/{OWNER_FILE}"):
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(info.pop("owner_pid")):
            LocalCluster(**info).down()


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    # `timeout` and CI runners send SIGTERM; turning it into KeyboardInterrupt lets fixtures tear down.
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    _reap_orphaned_test_clusters()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    cluster = LocalCluster.start(num_cpus=8, dashboard=True)
    owner = {
        "owner_pid": os.getpid(),
        "temp_dir": cluster.temp_dir,
        "gcs_port": cluster.gcs_port,
        "dashboard_port": cluster.dashboard_port,
    }
    (Path(cluster.temp_dir) / OWNER_FILE).write_text(json.dumps(owner))
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        # as `ensure_ray` does: Serve started from this driver runs with direct ingress
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": direct_ingress_env()})
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


@pytest.fixture
def shakespeare_parts(tmp_path: Path, shakespeare: Path) -> Path:
    """The first ~60 kB of tinyshakespeare cut into 4 files, so batches and blocks cross file borders."""
    text = shakespeare.read_text(encoding="utf-8")[:60_000]
    paragraphs = text.split("\n\n")
    out = tmp_path / "shakespeare"
    out.mkdir()
    per = len(paragraphs) // 4 + 1
    for i in range(4):
        (out / f"part{i}.txt").write_text("\n\n".join(paragraphs[i * per : (i + 1) * per]), encoding="utf-8")
    return out
