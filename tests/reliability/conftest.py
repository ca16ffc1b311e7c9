"""Fixtures for the reliability suite: a tiny served model on the shared cluster, and helpers.

The tiny model and the app builder come from the serving tests (`tests/serve/conftest.py`), so both
suites exercise the same model. Serve's HTTP proxy is started on a free port unless another suite
already started it in this session; the URL is read back from Serve itself, never assumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import (
    API_KEY,
    App,
    make_tiny_model,
    run_app,
    serve_http,  # noqa: F401 - registers the fixture here
)

REPO = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def rel_model(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("rel-tiny-llama"), shakespeare)


@pytest.fixture(scope="session")
def serve_url(request: pytest.FixtureRequest) -> str:
    """Base URL of Serve's proxy on this cluster: the serving suite's own `serve_http`."""
    return request.getfixturevalue("serve_http")


def deploy(serve_url: str, model: Path, name: str, **fields: Any) -> App:
    """Run a raylm app under its own route prefix; the caller deletes it (`serve.delete(name)`)."""
    return run_app(serve_url, model, name, **fields)


def completion(app: App, client: httpx.Client | None = None, **body: Any) -> httpx.Response:
    payload = {"model": app.model, "prompt": "ROMEO:", "max_tokens": 4, **body}
    poster = client or httpx
    return poster.post(f"{app.v1}/completions", json=payload, headers=AUTH, timeout=120)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    """The response has `status` and the OpenAI error shape; returns the `error` object."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if param != "__any__":
        assert err["param"] == param, err
    return err


def replica_actors(app_name: str, deployment: str = "LLMServer") -> list[Any]:
    """Live replica actors of one deployment of one app (state API: pid, actor id)."""
    from ray.util.state import list_actors

    return [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
        if a.class_name == f"ServeReplica:{app_name}:{deployment}"
    ]


@pytest.fixture(scope="module")
def bad_input_app(serve_url: str, rel_model: Path) -> Iterator[App]:
    from ray import serve

    app = deploy(serve_url, rel_model, "rel-bad", max_body_bytes=8192, max_tokens_limit=64, max_n=2)
    yield app
    serve.delete(app.name)
