"""`raylm cluster up|status|down`: a second real cluster beside the session one, stopped exactly."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import ray

from cluster.jobs_client import JobsClient
from cluster.local_cluster import LocalCluster


def test_cluster_up_status_down_stops_exactly_its_processes(
    cli, ray_cluster, jobs: JobsClient, tmp_path: Path
):
    env = {"RAYLM_STATE_DIR": str(tmp_path)}  # never the user's ~/.raylm
    state_path = tmp_path / "local-cluster.json"
    up = cli("cluster", "up", "--nodes", "2", "--cpus-per-node", "1", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        ours = LocalCluster.load(state_path)
        assert ours is not None and len(ours.nodes) == 1
        assert ours.dashboard_url in up.stdout and ours.dashboard_url != ray_cluster.dashboard_url
        our_pids = set(ours.pids())
        assert our_pids and not our_pids & set(ray_cluster.pids())

        # `ray start` returns once a node registered; the dashboard's node list can trail it on a busy host.
        for _ in range(30):
            status = cli("cluster", "status", env=env)
            assert status.returncode == 0, status.stderr
            if "2 node(s) alive" in status.stdout:
                break
            time.sleep(2)
        assert "2 node(s) alive" in status.stdout, status.stdout
        assert status.stdout.count("ALIVE") == 2 and "head" in status.stdout and "worker" in status.stdout

        twice = cli("cluster", "up", "--nodes", "1", env=env)
        assert twice.returncode == 2 and "already up" in twice.stderr

        down = cli("cluster", "down", env=env)
        assert down.returncode == 0, down.stderr
        assert not [p for p in our_pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not state_path.exists()
    finally:
        leftover = LocalCluster.load(state_path)
        if leftover is not None:
            leftover.down()

    # The session cluster was not touched: its jobs API and its Ray still answer.
    assert ray.cluster_resources().get("CPU", 0) >= 8
    assert isinstance(jobs.list(), list)
    gone = cli("cluster", "status", env=env)
    assert gone.returncode == 2 and "no cluster recorded" in gone.stderr
