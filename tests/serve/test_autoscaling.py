"""Autoscaling from the serve section: sustained load adds a second LLMServer replica, idleness removes it."""

from __future__ import annotations

import threading
import time

import httpx
from ray import serve

from tests.serve.conftest import API_KEY, run_app


def llm_replicas(app_name: str) -> int:
    status = serve.status().applications[app_name].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1)
    return predicate()


def test_scales_up_under_load_and_back_down(serve_http, tiny_model):
    app = run_app(
        serve_http,
        tiny_model,
        "scale",
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=4,
        autoscaling_look_back_period_s=2,
        num_cpus_per_replica=0.5,
        torch_threads_per_replica=1,
    )
    try:
        assert llm_replicas(app.name) == 1
        stop = threading.Event()

        def client() -> None:
            body = {"model": app.model, "prompt": "HAMLET:", "max_tokens": 150, "stream": True}
            with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                while not stop.is_set():
                    with http.stream("POST", f"{app.v1}/completions", json=body) as r:
                        for _ in r.iter_lines():
                            if stop.is_set():
                                break

        load = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in load:
            t.start()
        try:
            scaled_up = wait_for(lambda: llm_replicas(app.name) == 2, timeout_s=180)
        finally:
            stop.set()
            for t in load:
                t.join(timeout=60)
        assert scaled_up, "a second replica never started under sustained load"
        assert wait_for(lambda: llm_replicas(app.name) == 1, timeout_s=180), "never back to 1 replica"
    finally:
        serve.delete(app.name)
