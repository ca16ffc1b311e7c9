"""The endpoint through the official `openai` client (sync and async) and raw HTTP, on a real Serve app."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from ray import serve

from tests.serve.conftest import API_KEY

PROMPT = "ROMEO: Is the day so young?"
CHAT = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who comes?"}]


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0)


def async_client(app) -> openai.AsyncOpenAI:
    """A fresh async client per `asyncio.run`: its connection pool belongs to one event loop."""
    return openai.AsyncOpenAI(base_url=app.v1, api_key=API_KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def test_models_lists_the_folder(client, app):
    assert [m.id for m in client.models.list().data] == [app.model]


def test_completion_usage_matches_tokenizer_and_stream_matches(client, app, tokenizer):
    full = client.completions.create(model=app.model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert full.choices[0].finish_reason == "length"
    assert full.choices[0].text

    async def streamed() -> tuple[str, list]:
        stream = await async_client(app).completions.create(
            model=app.model,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks

    text, chunks = asyncio.run(streamed())
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sse_ends_with_done(app):
    body = {"model": app.model, "prompt": PROMPT, "max_tokens": 5, "stream": True}
    r = httpx.post(f"{app.v1}/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_chat_completion_and_stream(client, app, tokenizer):
    expected_prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    full = client.chat.completions.create(model=app.model, messages=CHAT, max_tokens=10, temperature=0)
    assert full.usage.prompt_tokens == len(tokenizer(expected_prompt, add_special_tokens=False)["input_ids"])
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("length", "stop")

    async def streamed() -> tuple[str, list]:
        stream = await async_client(app).chat.completions.create(
            model=app.model,
            messages=CHAT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks

    text, chunks = asyncio.run(streamed())
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sync_chat_stream(client, app):
    stream = client.chat.completions.create(model=app.model, messages=CHAT, max_tokens=6, stream=True, seed=3)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_n_choices_and_prompt_list(client, app):
    r = client.completions.create(model=app.model, prompt=[PROMPT, "JULIET:"], n=3, max_tokens=6, seed=7)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert r.usage.completion_tokens == 36
    assert len({c.text for c in r.choices}) > 1
    chat = client.chat.completions.create(model=app.model, messages=CHAT, n=2, max_tokens=5, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]


def test_same_seed_same_text(client, app):
    def sample(seed: int) -> str:
        r = client.completions.create(
            model=app.model,
            prompt=PROMPT,
            max_tokens=20,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            extra_body={"top_k": 40},
        )
        return r.choices[0].text

    assert sample(1234) == sample(1234)


def test_stop_string_truncates_and_reports_stop(client, app):
    free = (
        client.completions.create(model=app.model, prompt=PROMPT, max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    stop = free[8:11]
    cut = free[: free.find(stop)]
    r = client.completions.create(
        model=app.model, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "@@@"]
    )
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    stream = client.completions.create(
        model=app.model, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- errors ---------------------------------------------------------------------------------------
def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error


def test_auth_required_on_every_route_but_healthz(app):
    assert httpx.get(f"{app.base_url}/healthz", timeout=30).status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/metrics"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, f"{app.base_url}{path}", headers=headers, json={}, timeout=30)
            assert_error(r, 401)
    bad = openai.OpenAI(base_url=app.v1, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.completions.create(model=app.model, prompt="x", max_tokens=1)
    assert info.value.status_code == 401
    second_key = openai.OpenAI(base_url=app.v1, api_key="other-key", max_retries=0)
    assert second_key.models.list().data


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)
    assert info.value.body["param"] == "model"


def test_invalid_json_and_wrong_types_are_400(app):
    r = httpx.post(
        f"{app.v1}/completions",
        content=b'{"model": ',
        headers={**auth(), "content-type": "application/json"},
        timeout=30,
    )
    assert_error(r, 400)
    r = httpx.post(f"{app.v1}/completions", json=[1, 2], headers=auth(), timeout=30)
    assert_error(r, 400)
    r = httpx.post(
        f"{app.v1}/completions",
        json={"model": app.model, "prompt": "x", "temperature": 9},
        headers=auth(),
        timeout=30,
    )
    assert_error(r, 400, "temperature")
    r = httpx.post(
        f"{app.v1}/chat/completions",
        json={"model": app.model, "messages": [{"role": "robot", "content": "x"}]},
        headers=auth(),
        timeout=30,
    )
    assert_error(r, 400, "messages.0.role")
    r = httpx.post(f"{app.v1}/completions", json={"model": app.model}, headers=auth(), timeout=30)
    assert_error(r, 400, "prompt")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 5}, "n"),  # max_n = 4
        ({"max_tokens": 201}, "max_tokens"),  # max_tokens_limit = 200
        ({"max_tokens": 200, "prompt": "word " * 100}, "max_tokens"),  # prompt + max_tokens > context 256
        ({"prompt": "word " * 300}, "prompt"),  # the prompt alone is over the context
        ({"stop": ["a", "b", "c"]}, "stop"),  # max_stop_sequences = 2
        ({"prompt": ""}, "prompt"),
    ],
)
def test_limits_are_400_naming_the_field(client, app, fields, param):
    body = {"model": app.model, "prompt": PROMPT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**body)
    assert info.value.status_code == 400 and info.value.body["param"] == param


def test_body_over_limit_is_413(app):
    body = {"model": app.model, "prompt": "x" * 5000, "max_tokens": 1}  # max_body_bytes = 4096
    assert_error(httpx.post(f"{app.v1}/completions", json=body, headers=auth(), timeout=30), 413)


def test_unknown_route_has_error_shape(app):
    assert_error(httpx.get(f"{app.base_url}/v1/nothing", headers=auth(), timeout=30), 404)


def test_metrics_after_traffic(client, app):
    client.completions.create(model=app.model, prompt=PROMPT, max_tokens=3, stream=True).close()
    text = httpx.get(f"{app.base_url}/metrics", headers=auth(), timeout=30).text
    for name in (
        "raylm_requests_total",
        "raylm_request_errors_total",
        "raylm_prompt_tokens_total",
        "raylm_generation_tokens_total",
        "raylm_queue_depth",
        "raylm_time_to_first_token_seconds_bucket",
        "raylm_inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert 'raylm_request_errors_total{route="completions",status="400"}' in text


def test_overload_is_503_and_replica_survives(app):
    """max_ongoing_requests=24 + max_queued_requests=4: a burst of 48 long streams must overflow."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": app.model, "prompt": PROMPT, "max_tokens": 150, "stream": True}

            async def one() -> tuple[int, dict | None]:
                async with http.stream("POST", f"{app.v1}/completions", json=body, headers=auth()) as r:
                    raw = await r.aread()
                    return r.status_code, (json.loads(raw) if r.status_code != 200 else None)

            return await asyncio.gather(*(one() for _ in range(48)))

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    error = next(b for c, b in results if c == 503)["error"]
    assert error["code"] == "server_overloaded" and set(error) == {"message", "type", "param", "code"}
    handle = serve.get_deployment_handle("LLMServer", app_name=app.name)
    assert handle.stats.remote().result()["running"] == 0


# ---- the OpenAI surface clients send: content parts, developer role, logprobs, refusals, responses ----
@pytest.fixture(scope="module")
def hf_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def log_softmax_rows(model, ids: list[int]):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_text_parts_and_developer_role_equal_plain_messages(client, app):
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Speak verse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Who"}, {"type": "text", "text": "comes?"}]},
    ]
    plain = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who\ncomes?"}]
    a = client.chat.completions.create(model=app.model, messages=parts, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=app.model, messages=plain, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_non_text_part_is_400_naming_the_type(client, app):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=app.model, messages=messages, max_tokens=4)
    assert info.value.body["param"] == "messages.0.content" and "image_url" in info.value.body["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"17": 5}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ],
)
def test_unimplemented_parameters_are_refused_by_name(client, app, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=app.model, messages=CHAT, max_tokens=4, **{k: v for k, v in fields.items()}
        )
    assert info.value.body["param"] == param


def test_chat_logprobs_are_log_softmax_of_the_model(client, app, tokenizer, hf_model):
    r = client.chat.completions.create(
        model=app.model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    prompt = tokenizer(
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    ids = list(prompt)
    for entry in content:
        row = log_softmax_rows(hf_model, ids)[-1]
        token = int(row.argmax())  # greedy: the served token is the model's argmax
        assert entry.token == tokenizer.decode([token])
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-3)
        top = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        ids.append(token)


def test_completion_echo_logprobs_score_the_prompt(client, app, tokenizer, hf_model):
    r = client.completions.create(model=app.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == PROMPT and r.usage.completion_tokens == 0
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    rows = log_softmax_rows(hf_model, ids)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [rows[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    # echo + generation: prompt first, then the completion, logprobs for both
    r = client.completions.create(
        model=app.model, prompt=PROMPT, max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].logprobs.tokens) == len(ids) + 3
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=app.model, prompt=PROMPT, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


def test_responses_api_text_messages_and_stream(client, app):
    chat = client.chat.completions.create(model=app.model, messages=CHAT, max_tokens=8, temperature=0)
    r = client.responses.create(
        model=app.model, instructions="Speak verse.", input="Who comes?", max_output_tokens=8, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    messages = client.responses.create(
        model=app.model,
        input=[
            {"role": "developer", "content": "Speak verse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Who comes?"}]},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert messages.output_text == r.output_text
    events = list(
        client.responses.create(
            model=app.model,
            instructions="Speak verse.",
            input="Who comes?",
            max_output_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=app.model, input="x", text={"format": {"type": "json_object"}})
    assert info.value.body["param"] == "text.format"
