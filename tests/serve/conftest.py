"""Fixtures for the serving tests: a tiny model folder, an API key and a running Serve app.

The model is a randomly initialised 2-layer Llama with a large `initializer_range`: its logits are
far apart, so greedy decoding does not flip on float-summation differences between batch sizes, which
lets the batching test demand exactly equal texts. The tokenizer is raylm's own (chat template,
<|end|>, <|eos|>) trained on a slice of tinyshakespeare.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

API_KEY = "sk-test-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model(out: Path, corpus: Path, context: int = 256) -> Path:
    """The module docstring's 2-layer Llama, built by the serving benchmarks' own builder."""
    from benchmarks.tiny_model import build_tiny_llama

    return build_tiny_llama(
        out,
        hidden=128,
        layers=2,
        intermediate=344,
        heads=4,
        context=context,
        initializer_range=0.1,
        vocab_size=512,
        corpus=corpus,
        corpus_chars=200_000,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), shakespeare)


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from data_pipelines.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model)


@dataclass
class App:
    name: str
    base_url: str  # http://host:port/prefix
    model: str

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> Iterator[str]:
    """Serve's HTTP proxy on a free port of this host (other test sessions may run Serve too).

    If Serve already runs on this cluster, `serve.start` keeps its port: read back the real one.
    """
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    yield f"http://127.0.0.1:{serve.context._get_global_client().http_config.port}"


def run_app(serve_http: str, model_path: Path, name: str, **serve_fields: Any) -> App:
    from ray import serve

    from serve.app import build_app

    section = {"max_batch_size": 32, "num_cpus_per_replica": 1, "max_tokens_limit": 200, **serve_fields}
    previous = os.environ.get("RAYLM_API_KEYS")
    os.environ["RAYLM_API_KEYS"] = f"other-key,{API_KEY}"  # build_app reads the keys here, on the driver
    try:
        app = build_app({"model_path": str(model_path), "serve": section})
    finally:
        if previous is None:
            os.environ.pop("RAYLM_API_KEYS")
        else:
            os.environ["RAYLM_API_KEYS"] = previous
    serve.run(app, name=name, route_prefix=f"/{name}")
    return App(name=name, base_url=f"{serve_http}/{name}", model=model_path.name)


@pytest.fixture(scope="module")
def app(serve_http: str, tiny_model: Path) -> Iterator[App]:
    from ray import serve

    running = run_app(
        serve_http,
        tiny_model,
        "main",
        max_n=4,
        max_stop_sequences=2,
        max_body_bytes=4096,
        max_ongoing_requests=24,
        max_queued_requests=4,
    )
    yield running
    serve.delete(running.name)
