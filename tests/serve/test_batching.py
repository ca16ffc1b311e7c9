"""Iteration-level batching through HTTP: batched results equal solo results; a disconnect frees its slot."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
from ray import serve

from tests.serve.conftest import API_KEY


def prompts(shakespeare, count: int) -> list[str]:
    text = shakespeare.read_text(encoding="utf-8")
    return [text[1000 * i : 1000 * i + 15 + 9 * i] for i in range(count)]  # different lengths


def test_16_concurrent_streams_equal_sequential(app, shakespeare):
    batch = prompts(shakespeare, 16)
    handle = serve.get_deployment_handle("LLMServer", app_name=app.name)
    sync = openai.OpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0)

    def one_stream(prompt: str) -> str:
        stream = sync.completions.create(
            model=app.model, prompt=prompt, max_tokens=24, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream)

    alone = [one_stream(p) for p in batch]
    handle.stats.remote(reset_peak=True).result()

    async def together() -> list[str]:
        # Ray Serve counts a burst's not-yet-assigned requests against max_queued_requests (4 here), so
        # a 503 can happen under load; a retried greedy request must still give the same text.
        client = openai.AsyncOpenAI(base_url=app.v1, api_key=API_KEY, max_retries=5)

        async def one(prompt: str) -> str:
            stream = await client.completions.create(
                model=app.model, prompt=prompt, max_tokens=24, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*(one(p) for p in batch))

    concurrent = asyncio.run(together())
    assert concurrent == alone
    assert handle.stats.remote().result()["peak_running"] > 1  # they really shared the running batch


def test_client_disconnect_frees_the_batch_slot(app):
    handle = serve.get_deployment_handle("LLMServer", app_name=app.name)
    before = handle.stats.remote().result()
    body = {"model": app.model, "prompt": "KING:", "max_tokens": 200, "temperature": 0, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", f"{app.v1}/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generation has started
    # the response is closed: Serve cancels the request, LLMServer cancels the sequence in the engine
    deadline = time.monotonic() + 60
    stats = handle.stats.remote().result()
    while (stats["running"] or stats["cancelled"] == before["cancelled"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = handle.stats.remote().result()
    assert stats["running"] == 0
    assert stats["cancelled"] == before["cancelled"] + 1  # removed early, not finished by max_tokens
