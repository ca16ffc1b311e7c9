"""`raylm chat` as a user runs it: in a real pseudo-terminal (pexpect), against real Serve endpoints on
the session cluster, with the tiny model of the serving tests.

The reference is the endpoint itself, asked directly through the `openai` client: the answer the chat
streamed is the answer the endpoint gives to the same conversation, and the chat's second request
costs exactly the prompt tokens of a conversation that carries the first exchange.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from openai import OpenAI

from tests.serve.conftest import API_KEY, run_app, serve_http, tiny_model  # noqa: F401  (fixtures)

RAYLM = str(Path(sys.executable).with_name("raylm"))
USAGE = re.compile(r"\(prompt (\d+) tokens · answer (\d+) tokens")


@pytest.fixture(scope="module")
def chat_app(serve_http, tiny_model):  # noqa: F811  (the fixtures imported above)
    from ray import serve

    app = run_app(serve_http, tiny_model, "chat", max_tokens_limit=64)
    yield app
    serve.delete(app.name)


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "COLUMNS": "200", "OPENAI_API_KEY": API_KEY}
    child = pexpect.spawn(RAYLM, list(args), env=env, encoding="utf-8", timeout=180, dimensions=(50, 200))
    child.logfile_read = io.StringIO()  # the whole transcript, as the user saw it
    return child


def ask(child: pexpect.spawn, question: str) -> tuple[str, int, int]:
    """Type a question at the prompt; return the streamed answer and the usage the chat printed."""
    child.expect_exact("you> ")
    child.sendline(question)
    child.expect_exact("model> ")
    child.expect(USAGE)
    answer = child.before.replace("\r\n", "\n").strip()
    return answer, int(child.match.group(1)), int(child.match.group(2))


def quit_with_ctrl_d(child: pexpect.spawn) -> str:
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before


def test_chat_streams_answers_and_keeps_the_conversation(chat_app):
    child = spawn("chat", "--base-url", chat_app.v1, "--temperature", "0", "--max-tokens", "8")
    first, p1, c1 = ask(child, "Good morning to you")
    second, p2, c2 = ask(child, "And what then")
    assert "bye" in quit_with_ctrl_d(child)

    client = OpenAI(base_url=chat_app.v1, api_key=API_KEY)
    turn1 = [{"role": "user", "content": "Good morning to you"}]
    direct = client.chat.completions.create(model=chat_app.model, messages=turn1, temperature=0, max_tokens=8)
    assert first == direct.choices[0].message.content.strip()
    assert (p1, c1) == (direct.usage.prompt_tokens, direct.usage.completion_tokens)
    # The second request carried the first exchange: same prompt tokens as the whole conversation.
    turn2 = [*turn1, {"role": "assistant", "content": direct.choices[0].message.content}]
    turn2.append({"role": "user", "content": "And what then"})
    carried = client.chat.completions.create(
        model=chat_app.model, messages=turn2, temperature=0, max_tokens=8
    )
    alone = client.chat.completions.create(
        model=chat_app.model, messages=turn2[-1:], temperature=0, max_tokens=8
    )
    assert p2 == carried.usage.prompt_tokens > alone.usage.prompt_tokens
    assert second == carried.choices[0].message.content.strip()


def test_chat_reports_a_refused_key_and_exits(chat_app):
    child = spawn("chat", "--base-url", chat_app.v1, "--api-key", "not-a-key")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "refused the API key" in child.before


def test_chat_serves_a_model_folder_for_the_session_only(ray_cluster, serve_http, tiny_model):  # noqa: F811
    from ray import serve

    child = spawn("chat", str(tiny_model), "--temperature", "0", "--max-tokens", "6")
    child.expect_exact("chatting with", timeout=600)
    assert any(name.startswith("raylm-chat-") for name in serve.status().applications)
    _, prompt_tokens, _ = ask(child, "Speak, friend")
    assert prompt_tokens > 0
    quit_with_ctrl_d(child)
    transcript = child.logfile_read.getvalue()
    assert "the chat's endpoint has stopped" in transcript
    assert not any(name.startswith("raylm-chat-") for name in serve.status().applications)
    # Ray's and Serve's own lines went to the log file the chat named, not into the conversation.
    log = Path(re.search(r"library output \(Ray, Serve\) → (\S+)", transcript).group(1))
    assert "INFO" not in transcript and "Serve" in log.read_text()
