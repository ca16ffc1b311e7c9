"""`OpenAIIngress`: the HTTP face of the endpoint (FastAPI under `@serve.ingress`).

It authenticates, validates and tokenizes (so limits such as prompt + max_tokens ≤ context are checked
before any model work), forwards token ids to `LLMServer` through a streaming handle, and turns the
streamed chunks into OpenAI responses or server-sent events. Every failure becomes the OpenAI error
shape; an internal error is logged here and answered with a generic message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoConfig, AutoTokenizer

from serve.auth import bearer_ok, load_key_digests
from serve.config import ServeConfig
from serve.errors import APIError, error_body, validation_error
from serve.metrics import ServeMetrics
from serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)

log = logging.getLogger("ray.serve")

# For tokenizers that ship without a chat template (raylm's own tokenizers carry one).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

api = FastAPI(title="raylm OpenAI-compatible API", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods get the OpenAI error shape too."""
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


def context_length(config: Any, tokenizer: Any) -> int | None:
    """The model's context window: from the config, else the tokenizer's limit when it is a real one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


def _is_backpressure(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, BackPressureError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


class OpenAIIngress:
    """Routes of the OpenAI API on top of a streaming handle to `LLMServer`."""

    def __init__(
        self, llm: DeploymentHandle, model_path: str, serve_cfg: dict[str, Any], key_digests: list[str]
    ):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.llm = llm.options(method_name="generate", stream=True)
        self.model_name = self.cfg.model_name or Path(model_path.rstrip("/")).name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        self.context = context_length(
            AutoConfig.from_pretrained(model_path, local_files_only=True), self.tokenizer
        )
        self.digests = sorted(set(key_digests) | set(load_key_digests(self.cfg)))
        if self.cfg.require_api_key and not self.digests:
            raise RuntimeError(
                f"serve.require_api_key is true but no API key was found in ${self.cfg.api_keys_env}"
                f" or serve.api_key_file; set one, or require_api_key: false for local use only"
            )
        if not self.cfg.require_api_key:
            log.warning("API key check is OFF (serve.require_api_key: false); do not expose this endpoint")
        self.metrics = ServeMetrics()
        self.created = int(time.time())

    # ---- routes ---------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        async def render(_: Request) -> Response:
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        return await self._guard("metrics", request, render)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def listing(_: Request) -> Response:
            card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.context)
            return JSONResponse(ModelList(data=[card]).model_dump())

        return await self._guard("models", request, listing)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._guard("completions", request, self._completions)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._guard("chat_completions", request, self._chat)

    # ---- plumbing -------------------------------------------------------------------------------
    async def _guard(
        self, route: str, request: Request, handler: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Count, authenticate, run `handler`; any failure → OpenAI error body with the right status."""
        self.metrics.requests.labels(route).inc()
        try:
            if self.cfg.require_api_key and not bearer_ok(request.headers.get("authorization"), self.digests):
                raise APIError(
                    401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"
                )
            return await handler(request)
        except APIError as exc:
            error = exc
        except Exception:
            log.exception("internal error on %s", route)
            error = APIError(500, "internal server error", code="internal_error")
        self.metrics.errors.labels(route, str(error.status)).inc()
        return error.response()

    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="body_too_large")
        body = await request.body()
        if len(body) > self.cfg.max_body_bytes:
            raise APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="body_too_large")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None
        if req.model != self.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; served: {self.model_name!r}",
                "model",
                "model_not_found",
            )
        if req.n > self.cfg.max_n:
            raise APIError(400, f"n must be at most {self.cfg.max_n}", "n", "invalid_value")
        if len(req.stop_list()) > self.cfg.max_stop_sequences:
            raise APIError(
                400, f"at most {self.cfg.max_stop_sequences} stop sequences", "stop", "invalid_value"
            )
        return req

    def _max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str) -> int:
        """Check prompt + max_tokens against the context and the configured limit; fill in a default."""
        room = (self.context - prompt_len) if self.context else self.cfg.max_tokens_limit
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", prompt_param, "invalid_value")
        if room < 1:
            raise APIError(
                400,
                f"prompt is {prompt_len} tokens; the model context is {self.context}",
                prompt_param,
                "context_length_exceeded",
            )
        max_tokens = requested if requested is not None else min(room, self.cfg.max_tokens_limit)
        if max_tokens > self.cfg.max_tokens_limit:
            raise APIError(
                400, f"max_tokens must be at most {self.cfg.max_tokens_limit}", "max_tokens", "invalid_value"
            )
        if max_tokens > room:
            raise APIError(
                400,
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) > context ({self.context} tokens)",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    def _engine_request(self, req: Any, prompts: list[list[int]], max_tokens: list[int], chat: bool) -> dict:
        return {
            "prompts": prompts,
            "max_tokens": max_tokens,
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "seed": req.seed,
            "stop": req.stop_list(),
            "chat": chat,
            "ignore_eos": req.ignore_eos,
        }

    async def _start(self, engine_request: dict, arrived: float) -> tuple[Any, list[dict[str, Any]]]:
        """Send to LLMServer and wait for the first chunk, so backpressure still becomes a 503 status."""
        self.metrics.queue_depth.inc()
        stream = self.llm.remote(engine_request)
        try:
            first = await stream.__anext__()
        except Exception as exc:
            if _is_backpressure(exc):
                raise APIError(
                    503, "the model is at capacity; retry later", code="server_overloaded"
                ) from None
            raise
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.ttft.observe(time.perf_counter() - arrived)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in engine_request["prompts"]))
        return stream, first

    async def _chunks(self, stream: Any, first: list[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
        """All chunks of a started request, recording token metrics; cancels the model work if abandoned."""
        self.metrics.streaming.inc()
        last = time.perf_counter()
        try:
            chunk = first
            while True:
                tokens = sum(item["tokens"] for item in chunk)
                self.metrics.generated_tokens.inc(tokens)
                now = time.perf_counter()
                if chunk is not first and tokens:
                    for _ in range(tokens):
                        self.metrics.itl.observe((now - last) / tokens)
                last = now
                yield chunk
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    return
        finally:
            self.metrics.streaming.dec()
            stream.cancel()

    async def _completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        prompts = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in req.prompts()]
        param = "prompt"
        max_tokens = [self._max_tokens(req.max_tokens, len(p), param) for p in prompts]
        stream, first = await self._start(self._engine_request(req, prompts, max_tokens, chat=False), arrived)
        prompt_tokens = sum(len(p) for p in prompts)
        rid, created = new_id("cmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream_completion(stream, first, rid, created, prompt_tokens, include_usage),
                media_type="text/event-stream",
            )
        texts, reasons, completion_tokens = await self._collect(stream, first, len(prompts) * req.n)
        choices = [
            CompletionChoice(index=i, text=t, finish_reason=r)
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        body = CompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=usage
        )
        return JSONResponse(body.model_dump())

    async def _chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        messages = [m.model_dump() for m in req.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt), "messages")
        stream, first = await self._start(
            self._engine_request(req, [prompt], [max_tokens], chat=True), arrived
        )
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream_chat(stream, first, rid, created, len(prompt), include_usage),
                media_type="text/event-stream",
            )
        texts, reasons, completion_tokens = await self._collect(stream, first, req.n)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r)
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt) + completion_tokens,
        )
        body = ChatCompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=usage
        )
        return JSONResponse(body.model_dump())

    async def _collect(self, stream: Any, first: list[dict], count: int) -> tuple[list[str], list[str], int]:
        texts, reasons, tokens = [""] * count, ["stop"] * count, 0
        async for chunk in self._chunks(stream, first):
            for item in chunk:
                texts[item["index"]] += item["text"]
                tokens += item["tokens"]
                if item["finish_reason"]:
                    reasons[item["index"]] = item["finish_reason"]
        return texts, reasons, tokens

    async def _stream_sse(
        self,
        stream: Any,
        first: list[dict],
        rid: str,
        prompt_tokens: int,
        include_usage: bool,
        choice_of: Callable[[dict], BaseModel],
        envelope: Callable[..., BaseModel],
    ) -> AsyncIterator[str]:
        """Server-sent events shared by both routes: one chunk per engine item, optional usage, [DONE].

        `choice_of` turns an engine item into the route's choice; `envelope(choices, usage=None)` wraps
        choices in the route's chunk type.
        """
        completion_tokens = 0
        try:
            async for chunk in self._chunks(stream, first):
                for item in chunk:
                    completion_tokens += item["tokens"]
                    yield _sse(envelope([choice_of(item)]))
        except Exception:
            log.exception("stream %s failed", rid)
            yield f"data: {json.dumps(error_body(500, 'internal server error', code='internal_error'))}\n\n"
            return
        if include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            yield _sse(envelope([], usage=usage))
        yield "data: [DONE]\n\n"

    def _stream_completion(
        self, stream: Any, first: list[dict], rid: str, created: int, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        def choice_of(item: dict) -> CompletionChoice:
            return CompletionChoice(
                index=item["index"], text=item["text"], finish_reason=item["finish_reason"]
            )

        def envelope(choices: list, usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage
            )

        return self._stream_sse(stream, first, rid, prompt_tokens, include_usage, choice_of, envelope)

    def _stream_chat(
        self, stream: Any, first: list[dict], rid: str, created: int, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        started: set[int] = set()  # the first delta of each choice carries the assistant role

        def choice_of(item: dict) -> ChatStreamChoice:
            index = item["index"]
            delta = DeltaMessage(role=None if index in started else "assistant", content=item["text"])
            started.add(index)
            return ChatStreamChoice(index=index, delta=delta, finish_reason=item["finish_reason"])

        def envelope(choices: list, usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage
            )

        return self._stream_sse(stream, first, rid, prompt_tokens, include_usage, choice_of, envelope)


OpenAIIngress = serve.ingress(api)(OpenAIIngress)
