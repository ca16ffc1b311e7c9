"""Serve direct ingress: the replica's own HTTP server answers the OpenAI routes like the proxy does.

The session cluster's driver asks for direct ingress the way `cluster.local_ray.ensure_ray` does (the
switch in the job's runtime_env), so Serve's controller and replicas run with it; these tests reach
the replica's own port, found through Serve's target groups, with the official `openai` client.
"""

from __future__ import annotations

import httpx
import openai

from serve.direct_ingress import replica_urls
from tests.serve.conftest import API_KEY


def direct_v1(app) -> str:
    urls = replica_urls(app.name)
    assert len(urls) == 1, urls  # one replica, with its own port (not the proxy's)
    assert not app.base_url.startswith(urls[0])
    return f"{urls[0]}/{app.name}/v1"


def test_replica_port_serves_the_same_greedy_text_as_the_proxy(app):
    direct = openai.OpenAI(base_url=direct_v1(app), api_key=API_KEY, max_retries=0)
    proxied = openai.OpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0)
    ask = {"model": app.model, "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}
    want = proxied.completions.create(**ask).choices[0].text
    assert direct.completions.create(**ask).choices[0].text == want
    stream = direct.completions.create(**ask, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want


def test_replica_port_keeps_auth_and_openai_errors(app):
    v1 = direct_v1(app)
    r = httpx.post(f"{v1}/completions", json={"model": app.model, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["type"]
    r = httpx.post(
        f"{v1}/completions",
        json={"model": app.model, "prompt": "x", "max_tokens": -3},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
