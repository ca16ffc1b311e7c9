"""`raylm serve MODEL_DIR`: joins the cluster (RAY_ADDRESS), prints the address, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serve.conftest import API_KEY, free_port


def test_raylm_serve_folder_until_ctrl_c(ray_cluster, serve_http, tiny_model: Path):
    from ray import serve

    env = {**os.environ, "RAYLM_API_KEYS": API_KEY, "COLUMNS": "200"}
    sets = [f"serve.port={free_port()}", "serve.route_prefix=/cli", "serve.model_name=tiny"]
    cmd = [str(Path(sys.executable).with_name("raylm")), "serve", str(tiny_model)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 300
        seen = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            found = re.search(r"serving tiny at (http://\S+/v1)", line)
            url = found.group(1) if found else None
        assert url, "".join(seen[-30:])
        models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny"
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert "raylm" not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
