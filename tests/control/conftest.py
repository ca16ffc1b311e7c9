"""Fixtures for the control-plane tests: the session cluster's Jobs API, a CLI runner, a tiny project.

Each Ray job start costs seconds on this 2-core host, so the tests share the session cluster and
submit only a handful of one-line jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.jobs_client import JobsClient

RAYLM = str(Path(sys.executable).with_name("raylm"))


@pytest.fixture(scope="session")
def dashboard(ray_cluster) -> str:
    return ray_cluster.dashboard_url


@pytest.fixture(scope="session")
def jobs(dashboard) -> JobsClient:
    return JobsClient(dashboard)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run `raylm ARGS...` as a user would, in a subprocess; `env` entries override (None removes)."""

    def run(*args: str, env: dict[str, str | None] | None = None, timeout: float = 600):
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return subprocess.run(
            [RAYLM, *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
        )

    return run


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A small project root with the folders a package must leave out (.git, runs, .venv, caches)."""
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "hello.py").write_text(
        "import os, sys, yaml\n"
        "cfg = yaml.safe_load(open(sys.argv[1]))\n"
        "print('run_name', cfg['cluster']['run_name'], 'max_steps', cfg['train']['max_steps'])\n"
        "print('env', os.environ.get('RAYLM_TEST_VAR'))\n"
        "print('files', sorted(os.listdir('.')))\n"
    )
    for junk in (
        ".git/objects/big",
        "runs/demo/checkpoint_0/model.bin",
        ".venv/lib/x.py",
        "x.egg-info/PKG-INFO",
        "__pycache__/hello.cpython-311.pyc",
        "bench-results/r.json",
        ".tools/bin/helm",
    ):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\0" * 2048)
    return root
