"""`OpenAIServer`: the OpenAI API served by the model replica itself (FastAPI under `@serve.ingress`).

It authenticates, validates and tokenizes (so limits such as prompt + max_tokens ≤ context are checked
before any model work), runs the request on this replica's engine (`LLMServer.generate`, in-process)
and turns the chunks into OpenAI responses or server-sent events. One deployment, so a token crosses
one process boundary (replica → Serve proxy) on its way to the client; a separate router deployment
would only pay off when one endpoint routes several models. Every failure becomes the OpenAI error
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
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoConfig

from serve.auth import bearer_ok, load_key_digests
from serve.config import ServeConfig
from serve.errors import APIError, error_body, validation_error
from serve.metrics import ServeMetrics
from serve.model_server import LLMServer
from serve.options import admitted_requests, torch_threads
from serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    ChoiceLogprobs,
    ChunkItem,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
)
from serve.responses_api import ResponsesStream, response_object

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


def _sse(*payloads: BaseModel) -> str:
    return "".join(f"data: {p.model_dump_json()}\n\n" for p in payloads)


class OpenAIServer(LLMServer):
    """The model replica with the OpenAI routes on top of its own engine."""

    def __init__(self, model_path: str, serve_cfg: dict[str, Any], key_digests: list[str]):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        super().__init__(
            model_path,
            self.cfg.max_batch_size,
            torch_threads(self.cfg),
            prefill_chunk_tokens=self.cfg.prefill_chunk_tokens,
            max_prefill_delay_steps=self.cfg.max_prefill_delay_steps,
            stream_max_chunks_per_s=self.cfg.stream_max_chunks_per_s,
            stream_interval_max_ms=self.cfg.stream_interval_max_ms,
        )
        self.model_name = self.cfg.model_name or Path(model_path.rstrip("/")).name
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
        self.admitted = admitted_requests(self.cfg)
        self.active = 0  # generation requests admitted and not finished
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ---- routes ---------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_route(self, request: Request) -> Response:
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

    @api.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return await self._guard("responses", request, self._responses)

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
        body = b""
        async for part in request.stream():  # counted as it arrives: a chunked body cannot lie
            body += part
            if len(body) > self.cfg.max_body_bytes:
                raise APIError(
                    413, f"request body over {self.cfg.max_body_bytes} bytes", code="body_too_large"
                )
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
        for param, why in req.unsupported_fields():
            raise APIError(400, why, param, "unsupported_parameter")
        if isinstance(req, SamplingFields):
            if req.n > self.cfg.max_n:
                raise APIError(400, f"n must be at most {self.cfg.max_n}", "n", "invalid_value")
            if len(req.stop_list()) > self.cfg.max_stop_sequences:
                raise APIError(
                    400, f"at most {self.cfg.max_stop_sequences} stop sequences", "stop", "invalid_value"
                )
        return req

    def _max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str, name: str) -> int:
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
            raise APIError(400, f"{name} must be at most {self.cfg.max_tokens_limit}", name, "invalid_value")
        if max_tokens > room:
            raise APIError(
                400,
                f"prompt ({prompt_len}) + {name} ({max_tokens}) > context ({self.context} tokens)",
                name,
                "context_length_exceeded",
            )
        return max_tokens

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _engine_request(
        self, req: SamplingFields, prompts: list[list[int]], max_tokens: list[int], **extra: Any
    ) -> GenerationRequest:
        return GenerationRequest(
            prompts=prompts,
            max_tokens=max_tokens,
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list(),
            ignore_eos=req.ignore_eos,
            stream=req.stream,
            **extra,
        )

    async def _start(
        self, engine_request: GenerationRequest, arrived: float
    ) -> tuple[AsyncIterator[GenerationChunk], GenerationChunk]:
        """Admit the request (503 beyond this replica's limit) and wait for its first chunk, so an
        engine failure before any output is still an HTTP status, not a broken stream."""
        if self.admitted is not None and self.active >= self.admitted:
            raise APIError(503, "the model is at capacity; retry later", code="server_overloaded")
        self.metrics.queue_depth.inc()
        chunks = self._tracked(engine_request)
        try:
            first = await chunks.__anext__()
        except BaseException:
            await chunks.aclose()
            raise
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.ttft.observe(time.perf_counter() - arrived)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in engine_request.prompts))
        return chunks, first

    async def _tracked(self, engine_request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """`generate` with admission accounting and token metrics (one observation per chunk)."""
        self.active += 1
        self.metrics.streaming.inc()
        last = time.perf_counter()
        try:
            async for chunk in self.generate(engine_request):
                tokens = sum(item.tokens for item in chunk)
                self.metrics.generated_tokens.inc(tokens)
                now = time.perf_counter()
                for _ in range(tokens):
                    self.metrics.itl.observe((now - last) / tokens)
                last = now
                yield chunk
        finally:
            self.active -= 1
            self.metrics.streaming.dec()

    async def _collect(
        self, chunks: AsyncIterator[GenerationChunk], first: GenerationChunk, count: int
    ) -> list[ChunkItem]:
        """Merge every chunk of a non-streaming request into one item per choice."""
        merged = [ChunkItem(i, finish_reason="stop") for i in range(count)]

        def add(chunk: GenerationChunk) -> None:
            for item in chunk:
                merged[item.index].add(item)

        try:
            add(first)
            async for chunk in chunks:
                add(chunk)
        finally:
            await chunks.aclose()
        return merged

    async def _sse_stream(
        self,
        chunks: AsyncIterator[GenerationChunk],
        first: GenerationChunk,
        rid: str,
        prompt_tokens: int,
        include_usage: bool,
        choice_of: Callable[[ChunkItem], BaseModel],
        envelope: Callable[..., BaseModel],
    ) -> AsyncIterator[str]:
        """Server-sent events shared by completions and chat: one write per chunk (all its choices),
        optional usage, [DONE]. `envelope(choices, usage=None)` wraps choices in the route's type."""
        completion_tokens = 0
        try:
            chunk = first
            while True:
                completion_tokens += sum(item.tokens for item in chunk)
                yield _sse(*(envelope([choice_of(item)]) for item in chunk))
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
        except Exception:
            log.exception("stream %s failed", rid)
            yield f"data: {json.dumps(error_body(500, 'internal server error', code='internal_error'))}\n\n"
            return
        finally:
            await chunks.aclose()
        if include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            yield _sse(envelope([], usage=usage))
        yield "data: [DONE]\n\n"

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    # ---- /v1/completions --------------------------------------------------------------------------
    def _completion_logprobs(
        self, item: ChunkItem, prompt: list[int] | None, offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Legacy logprobs of one chunk item: the echoed prompt's tokens (when given) then its own."""
        out = CompletionLogprobs()
        entries: list[tuple[int, float | None, list | None]] = []
        if prompt is not None:
            scores = item.prompt_logprobs or [None] * len(prompt)
            entries += [
                (t, s[0] if s else None, s[1] if s else None) for t, s in zip(prompt, scores, strict=True)
            ]
        entries += item.logprobs
        for token, logprob, top in entries:
            text = self.token_text(token)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(None if top is None else {self.token_text(t): v for t, v in top})
            out.text_offset.append(offset)
            offset += len(text)
        return out, offset

    async def _completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(
                400, "max_tokens must be at least 1 (0 only with echo)", "max_tokens", "invalid_value"
            )
        texts = req.prompts()
        prompts = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts]
        max_tokens = [self._max_tokens(req.max_tokens, len(p), "prompt", "max_tokens") for p in prompts]
        extra = {"logprobs": req.logprobs, "prompt_logprobs": req.echo and req.logprobs is not None}
        chunks, first = await self._start(self._engine_request(req, prompts, max_tokens, **extra), arrived)
        prompt_tokens = sum(len(p) for p in prompts)
        rid, created = new_id("cmpl"), int(time.time())
        wants_logprobs = req.logprobs is not None
        offsets: dict[int, int] = {}

        def choice_of(item: ChunkItem) -> CompletionChoice:
            index = item.index
            echo = req.echo and index not in offsets  # the prompt goes before the choice's first text
            text = (texts[index // req.n] if echo else "") + item.text
            logprobs = None
            if wants_logprobs:
                prompt = prompts[index // req.n] if echo else None
                start = offsets.get(index, 0)
                logprobs, offsets[index] = self._completion_logprobs(item, prompt, start)
            offsets.setdefault(index, 0)
            return CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=item.finish_reason
            )

        if req.stream:

            def envelope(choices: list, usage: Usage | None = None) -> CompletionResponse:
                return CompletionResponse(
                    id=rid, created=created, model=self.model_name, choices=choices, usage=usage
                )

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse_stream(chunks, first, rid, prompt_tokens, include_usage, choice_of, envelope),
                media_type="text/event-stream",
            )
        merged = await self._collect(chunks, first, len(prompts) * req.n)
        choices = [choice_of(m) for m in merged]
        completion_tokens = sum(m.tokens for m in merged)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        body = CompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=usage
        )
        return JSONResponse(body.model_dump())

    # ---- /v1/chat/completions ---------------------------------------------------------------------
    def _chat_logprobs(self, item: ChunkItem, top: int) -> ChoiceLogprobs:
        content = []
        for token, logprob, alternatives in item.logprobs:
            text = self.token_text(token)
            tops = [
                TopLogprob(token=(t := self.token_text(i)), logprob=v, bytes=list(t.encode()))
                for i, v in (alternatives or [])[:top]
            ]
            content.append(
                TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=tops)
            )
        return ChoiceLogprobs(content=content)

    async def _chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        prompt = self._chat_prompt([m.for_template() for m in req.messages])
        max_tokens = self._max_tokens(
            req.max_completion_tokens or req.max_tokens, len(prompt), "messages", "max_tokens"
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        chunks, first = await self._start(
            self._engine_request(req, [prompt], [max_tokens], chat=True, logprobs=logprobs), arrived
        )
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            started: set[int] = set()  # the first delta of each choice carries the assistant role

            def stream_choice(item: ChunkItem) -> ChatStreamChoice:
                index = item.index
                delta = DeltaMessage(role=None if index in started else "assistant", content=item.text)
                started.add(index)
                scores = self._chat_logprobs(item, logprobs) if logprobs is not None else None
                return ChatStreamChoice(
                    index=index, delta=delta, logprobs=scores, finish_reason=item.finish_reason
                )

            def envelope(choices: list, usage: Usage | None = None) -> ChatCompletionChunk:
                return ChatCompletionChunk(
                    id=rid, created=created, model=self.model_name, choices=choices, usage=usage
                )

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse_stream(chunks, first, rid, len(prompt), include_usage, stream_choice, envelope),
                media_type="text/event-stream",
            )
        merged = await self._collect(chunks, first, req.n)
        choices = [
            ChatChoice(
                index=m.index,
                message=AssistantMessage(content=m.text),
                logprobs=self._chat_logprobs(m, logprobs) if logprobs is not None else None,
                finish_reason=m.finish_reason,
            )
            for m in merged
        ]
        completion_tokens = sum(m.tokens for m in merged)
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt) + completion_tokens,
        )
        body = ChatCompletionResponse(
            id=rid, created=created, model=self.model_name, choices=choices, usage=usage
        )
        return JSONResponse(body.model_dump())

    # ---- /v1/responses ----------------------------------------------------------------------------
    async def _responses(self, request: Request) -> Response:
        arrived = time.perf_counter()
        req: ResponsesRequest = await self._parse(request, ResponsesRequest)
        prompt = self._chat_prompt(req.messages())
        max_tokens = self._max_tokens(req.max_output_tokens, len(prompt), "input", "max_output_tokens")
        engine_request = GenerationRequest(
            prompts=[prompt],
            max_tokens=[max_tokens],
            temperature=req.temperature,
            top_p=req.top_p,
            chat=True,
            stream=req.stream,
        )
        chunks, first = await self._start(engine_request, arrived)
        rid, created = new_id("resp"), time.time()
        if req.stream:
            events = ResponsesStream(rid, created, req, self.model_name, len(prompt))
            return StreamingResponse(events.sse(chunks, first), media_type="text/event-stream")
        (merged,) = await self._collect(chunks, first, 1)
        body = response_object(
            rid,
            created,
            req,
            self.model_name,
            merged.text,
            merged.finish_reason,
            len(prompt),
            merged.tokens,
        )
        return JSONResponse(body)


OpenAIServer = serve.ingress(api)(OpenAIServer)
