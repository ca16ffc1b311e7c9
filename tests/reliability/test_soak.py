"""A short run of the bounded soak (benchmarks/soak.py) as users run it: above one replica's capacity,
overflow is answered 503 and every request that was not rejected gets a complete answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.reliability.conftest import REPO


@pytest.mark.slow
def test_short_soak_above_capacity(ray_cluster, serve_url, rel_model, tmp_path):
    from ray import serve

    out = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "soak.py"),
        "--model",
        str(rel_model),
        "--duration-s",
        "20",
        "--clients",
        "12",
        "--max-ongoing",
        "2",
        "--max-queued",
        "2",
        "--max-tokens",
        "12",
        "--json",
        str(out),
    ]
    done = subprocess.run(
        cmd, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )  # RAY_ADDRESS is set: it joins the shared cluster
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    print("soak report:", report)
    assert report["ok"] and report["incomplete"] == 0 and report["other_errors"] == {}, report
    assert report["complete"] > 0 and report["rejected_503"] > 0, report  # it really ran above capacity
    assert report["latency_p50_s"] <= report["latency_p99_s"]
    assert "p99" in done.stdout and "soak" not in serve.status().applications  # it cleaned up after itself
