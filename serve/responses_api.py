"""The OpenAI Responses API (`/v1/responses`) on top of the chat engine path: objects and stream events.

A response holds one output item, an assistant `message` with one `output_text` part. Streaming sends
the typed events the `openai` client parses (`response.created` … `response.output_text.delta` …
`response.completed`), each as `event: <type>` + `data: <json>` with a rising `sequence_number`; a
reply cut by `max_output_tokens` ends `incomplete` (`incomplete_details.reason`), as OpenAI does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from serve.errors import error_body
from serve.protocol import GenerationChunk, ResponsesRequest, new_id

log = logging.getLogger("ray.serve")


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status != "in_progress"
        else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def response_object(
    rid: str,
    created: float,
    req: ResponsesRequest,
    model: str,
    text: str | None,
    finish_reason: str | None,
    input_tokens: int,
    output_tokens: int,
    item_id: str | None = None,
) -> dict[str, Any]:
    """The `response` object; `text` None: still in progress (no output yet)."""
    if text is None:
        status, output, usage = "in_progress", [], None
    else:
        status = "incomplete" if finish_reason == "length" else "completed"
        output = [_message(item_id or new_id("msg"), text, status)]
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": False,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "metadata": req.metadata or {},
        "usage": usage,
    }


class ResponsesStream:
    """Server-sent events of one streamed response."""

    def __init__(
        self, rid: str, created: float, req: ResponsesRequest, model: str, input_tokens: int
    ) -> None:
        self.rid, self.created, self.req, self.model = rid, created, req, model
        self.input_tokens = input_tokens
        self.item_id = new_id("msg")
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def _response(self, text: str | None, reason: str | None = None, tokens: int = 0) -> dict[str, Any]:
        return response_object(
            self.rid,
            self.created,
            self.req,
            self.model,
            text,
            reason,
            self.input_tokens,
            tokens,
            self.item_id,
        )

    async def sse(
        self, chunks: AsyncIterator[GenerationChunk], first: GenerationChunk
    ) -> AsyncIterator[str]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield (
            self._event("response.created", response=self._response(None))
            + self._event("response.in_progress", response=self._response(None))
            + self._event(
                "response.output_item.added", output_index=0, item=_message(self.item_id, "", "in_progress")
            )
            + self._event("response.content_part.added", part=empty_part, **where)
        )
        text, tokens, reason = "", 0, None
        try:
            chunk = first
            while True:
                (item,) = chunk
                text, tokens = text + item.text, tokens + item.tokens
                reason = item.finish_reason or reason
                if item.text:
                    yield self._event("response.output_text.delta", delta=item.text, logprobs=[], **where)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
        except Exception:
            log.exception("response stream %s failed", self.rid)
            yield self._event(
                "error", **error_body(500, "internal server error", code="internal_error")["error"]
            )
            return
        finally:
            await chunks.aclose()
        done = self._response(text, reason, tokens)
        final = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        yield (
            self._event("response.output_text.done", text=text, logprobs=[], **where)
            + self._event("response.content_part.done", part={**empty_part, "text": text}, **where)
            + self._event("response.output_item.done", output_index=0, item=done["output"][0])
            + self._event(final, response=done)
        )
