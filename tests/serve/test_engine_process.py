"""The engine's own process: its death fails requests cleanly and Serve replaces the replica; a replica
that shuts down or is killed takes its engine process with it (no orphans)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from ray import serve

from tests.serve.conftest import API_KEY, App, run_app

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_pid(app: App) -> int:
    return serve.get_deployment_handle("LLMServer", app_name=app.name).stats.remote().result()["engine_pid"]


def serving_engine_pid(app: App, other_than: int | None = None, timeout_s: float = 120) -> int | None:
    """The engine pid of a replica that answers, waiting while Serve replaces a failed one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = engine_pid(app)
            if pid != other_than:
                return pid
        except Exception:  # a replica whose engine died, or a killed replica, until Serve replaces it
            pass
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def engine_app(serve_http, tiny_model) -> Iterator[App]:
    app = run_app(serve_http, tiny_model, "engine-proc", health_check_period_s=1, health_check_timeout_s=5)
    yield app
    if app.name in serve.status().applications:
        serve.delete(app.name)


def completion(app: App, stream: bool) -> httpx.Response:
    body = {"model": app.model, "prompt": "KING:", "max_tokens": 50, "temperature": 0, "stream": stream}
    return httpx.post(f"{app.v1}/completions", json=body, headers=HEADERS, timeout=60)


def test_engine_death_fails_in_flight_requests_and_serve_replaces_the_replica(engine_app):
    pid = engine_pid(engine_app)
    assert running(pid) and completion(engine_app, stream=False).status_code == 200
    os.kill(pid, signal.SIGSTOP)  # the engine takes the requests but answers nothing...
    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(completion, engine_app, stream) for stream in (False, True)]
        time.sleep(1.5)
        assert not any(f.done() for f in in_flight)
        os.kill(pid, signal.SIGKILL)  # ...then dies: both requests end now, with an OpenAI error
        for future in in_flight:
            response = future.result(timeout=30)
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "internal_error"
    # the replica's health check fails, so Serve starts a new replica with a new engine process
    new_pid = serving_engine_pid(engine_app, other_than=pid)
    assert new_pid not in (None, pid) and running(new_pid)
    assert completion(engine_app, stream=False).status_code == 200


def test_killed_replica_takes_its_engine_process_with_it(engine_app):
    stats = serve.get_deployment_handle("LLMServer", app_name=engine_app.name).stats.remote().result()
    os.kill(stats["replica_pid"], signal.SIGKILL)  # no __del__, no atexit: the child sees EOF and exits
    deadline = time.monotonic() + 60
    while running(stats["engine_pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(stats["engine_pid"])


def test_replica_shutdown_stops_the_engine_process(engine_app):
    pid = serving_engine_pid(engine_app)
    assert pid is not None and running(pid)
    serve.delete(engine_app.name)
    deadline = time.monotonic() + 60
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(pid)
