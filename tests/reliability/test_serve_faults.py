"""Serving under faults: a replica killed under steady load, and SIGTERM to `raylm serve` mid-stream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.reliability.conftest import AUTH, deploy, replica_actors
from tests.serve.conftest import API_KEY


def _wait(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class RetryingClient(threading.Thread):
    """Sends completions in a loop until stopped; a 503 is retried (what a client is told to do)."""

    def __init__(self, url: str, model: str, stop: threading.Event, max_retries: int = 200):
        super().__init__(daemon=True)
        self.url, self.model, self.stop, self.max_retries = url, model, stop, max_retries
        self.statuses: Counter[int] = Counter()
        self.completed = 0
        self.gave_up = 0

    def run(self) -> None:
        body = {"model": self.model, "prompt": "ROMEO:", "max_tokens": 8, "ignore_eos": True}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                for _ in range(self.max_retries):
                    try:
                        resp = client.post(f"{self.url}/completions", json=body, headers=AUTH)
                        status = resp.status_code
                    except httpx.HTTPError:
                        status = -1  # connection-level failure
                    self.statuses[status] += 1
                    if status == 200:
                        assert resp.json()["usage"]["completion_tokens"] == 8
                        self.completed += 1
                        break
                    if status != 503:
                        break
                    time.sleep(0.2)
                else:
                    self.gave_up += 1


def test_killed_replica_is_replaced_and_clients_retrying_on_503_succeed(serve_url, rel_model):
    from ray import serve

    app = deploy(
        serve_url,
        rel_model,
        "rel-kill",
        min_replicas=1,
        max_replicas=1,
        max_ongoing_requests=4,
        max_queued_requests=8,
        health_check_period_s=1,
        health_check_timeout_s=5,
    )
    stop = threading.Event()
    clients = [RetryingClient(app.v1, app.model, stop) for _ in range(4)]
    try:
        (victim,) = replica_actors(app.name)
        for c in clients:
            c.start()
        _wait(lambda: sum(c.completed for c in clients) >= 8, 120, "steady load")
        done_before = sum(c.completed for c in clients)
        os.kill(victim.pid, signal.SIGKILL)

        def replaced():
            alive = [a for a in replica_actors(app.name) if a.actor_id != victim.actor_id]
            return alive and serve.status().applications[app.name].status == "RUNNING"

        _wait(replaced, 180, "a replacement replica")
        _wait(lambda: sum(c.completed for c in clients) >= done_before + 16, 120, "answers after the kill")
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=150)
        serve.delete(app.name)
    statuses = sum((c.statuses for c in clients), Counter())
    print("replica-kill client statuses:", dict(statuses))
    assert sum(c.gave_up for c in clients) == 0, statuses
    # Only the requests in flight on the killed replica may fail; every other answer is a 200 or a 503.
    other = {s: n for s, n in statuses.items() if s not in (200, 503)}
    assert sum(other.values()) <= app_in_flight_limit(), statuses


def app_in_flight_limit() -> int:
    return 4  # max_ongoing_requests of the killed replica


def _stream(url: str, model: str, results: list, started: threading.Event) -> None:
    body = {
        "model": model,
        "prompt": "KING:",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events, outcome = [], "hung"
    try:
        with httpx.stream("POST", f"{url}/completions", json=body, headers=AUTH, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
        outcome = (
            "done"
            if events and events[-1] == "[DONE]"
            else "error-event"
            if '"error"' in events[-1]
            else "cut"
        )
    except httpx.HTTPError as exc:
        outcome = f"closed:{type(exc).__name__}"
    parsed = [json.loads(e) for e in events if e.startswith("{")]
    usage = [p["usage"] for p in parsed if p.get("usage")]
    results.append((outcome, usage[-1]["completion_tokens"] if usage else None))


def test_sigterm_to_raylm_serve_drains_streams_and_exits(ray_cluster, serve_url, rel_model, tmp_path):
    from ray import serve

    env = {**os.environ, "RAYLM_API_KEYS": API_KEY, "COLUMNS": "200", "NO_COLOR": "1"}
    sets = [
        "serve.route_prefix=/rel-term",
        "serve.model_name=tiny-term",
        "serve.graceful_shutdown_timeout_s=30",
        "serve.max_tokens_limit=256",
    ]
    cmd = [str(Path(sys.executable).with_name("raylm")), "serve", str(rel_model)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    log = tmp_path / "serve.out"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        found = _wait(
            lambda: re.search(r"serving tiny-term at (http://\S+/v1)", log.read_text()), 300, "serving"
        )
        url = found.group(1)
        results: list = []
        started = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_stream, args=(url, "tiny-term", results, s)) for s in started]
        for t in threads:
            t.start()
        for s in started:
            assert s.wait(120), "a stream never started"
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=150)
        assert not any(t.is_alive() for t in threads), "a client stream hung"
        assert proc.wait(timeout=150) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "draining" in output and "stopped" in output, output[-2000:]
    # Every stream ended: complete (all 200 tokens, then [DONE]) or with an error event; none hung.
    assert len(results) == 4 and all(o in ("done", "error-event") for o, _ in results), results
    assert all(n == 200 for o, n in results if o == "done"), results
    print("SIGTERM stream outcomes:", results)
    assert "raylm" not in serve.status().applications
    assert API_KEY not in output
