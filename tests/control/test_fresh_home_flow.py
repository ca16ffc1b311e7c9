"""The README's multi-node flow as a new user runs it: a home where Ray never ran (no token), the
virtualenv not activated (its binaries called by path, `python` on PATH is some other interpreter),
`raylm cluster up` → `raylm submit train --wait` → `raylm jobs list` → `raylm cluster down`.

This is the flow that broke three ways (no token, the wrong `python` for the job entrypoint, the job's
working_dir deleted under its driver by another raylet on the same host); it runs exactly the README's
commands, with fewer training steps.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cluster.local_cluster import LocalCluster

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SHORT = [
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
]


def fresh_user_env(home: Path) -> dict[str, str]:
    """The environment of a user who never ran Ray: nothing of this session's Ray, no venv on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "RAYLM_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    return env


@pytest.mark.slow
def test_cluster_up_submit_wait_list_down_from_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_user_env(home)

    def raylm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "raylm"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    state = home / ".raylm" / "local-cluster.json"
    up = raylm("cluster", "up", "--nodes", "3", "--cpus-per-node", "2")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        token = home / ".ray" / "auth_token"
        assert f"created a Ray auth token in {token}" in up.stdout.replace("\n", "")
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        cluster = LocalCluster.load(state)
        assert cluster is not None and len(cluster.nodes) == 2
        pids = cluster.pids()

        storage = tmp_path / "runs"
        sets = [a for item in [*SHORT, f"cluster.storage_path={storage}"] for a in ("--set", item)]
        submit = raylm(
            "submit", "train", "configs/tiny-cpu.yaml", "--address", cluster.dashboard_url, "--wait", *sets,
            timeout=900,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout[-5000:] + submit.stderr[-3000:]
        assert "SUCCEEDED" in submit.stdout
        export = storage / "tiny-cpu" / "export" / "pretrained"
        assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()

        listed = raylm("jobs", "list")  # no --address: the cluster `raylm cluster up` recorded
        assert listed.returncode == 0, listed.stderr
        assert "1 job(s)" in listed.stdout and "SUCCEEDED" in listed.stdout

        down = raylm("cluster", "down")
        assert down.returncode == 0, down.stderr
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive and not cluster.is_up()
        assert not state.exists()
    finally:
        leftover = LocalCluster.load(state)
        if leftover is not None:
            leftover.down()
