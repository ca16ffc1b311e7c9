"""Request and response models mirroring the OpenAI API (the subset raylm serves), and the typed
contract between those routes and the replica's engine (`GenerationRequest` in, `ChunkItem`s out).

Shapes follow the OpenAI spec as vLLM's `entrypoints/openai/protocol.py` mirrors it, so the official
`openai` client works unchanged. Unknown fields are ignored, like vLLM does, so generic clients keep
working; but a known field that would change the output and that raylm does not implement (tools,
JSON mode, penalties, logit bias) is refused with a 400 naming it (`unsupported_fields`), never
silently ignored. Implemented fields are validated strictly and a violation names its field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 or -1 = no top-k (vLLM uses -1)")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: always generate max_tokens")
    # Known but not implemented: accepted only at their no-op values (see `unsupported_fields`).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to a value raylm would otherwise have to ignore."""
        out = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append((name, f"{name} is not supported (only 0)"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            out.append(("response_format", f"response_format type {kind!r} is not supported (only 'text')"))
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            out.append((name, f"{name} (function calling) is not supported by this model server"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                out.append((name, f"{name} is not supported (only 'none')"))
        return out

    @field_validator("top_k", mode="before")
    @classmethod
    def _minus_one_is_off(cls, v: object) -> object:
        return 0 if v == -1 else v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)  # the OpenAI default; 0 only with echo (prompt scoring)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def text_of_content(content: object) -> str:
    """A message's `content`: a string, or a list of text parts (joined with newlines, as vLLM does).

    Any other part type (image_url, input_audio, file, ...) raises a ValueError naming it, which
    becomes a 400 whose `param` is the message's content.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "input_text", "output_text"):
            raise ValueError(f"content part {j} has type {kind!r}; only 'text' parts are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {j} (type {kind!r}) needs a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: object) -> str:
        return text_of_content(v)

    def for_template(self) -> dict[str, str]:
        """`developer` is the newer name of `system` (OpenAI); chat templates know only `system`."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token (echoed prompt tokens first)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raylm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- /v1/responses (the Responses API: text or message input, output items, typed stream events) ----
class ResponseInputMessage(ChatMessage):
    """A chat message as the Responses API sends it (the same roles and content parts, typed)."""

    type: Literal["message"] = "message"


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[ResponseInputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[ResponseInputMessage]) -> str | list[ResponseInputMessage]:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        return v

    def unsupported_fields(self) -> list[tuple[str, str]]:
        out = []
        if self.tools:
            out.append(("tools", "tools (function calling) are not supported by this model server"))
        if self.tool_choice not in (None, "none", "auto"):
            out.append(("tool_choice", "tool_choice is not supported"))
        kind = ((self.text or {}).get("format") or {}).get("type", "text")
        if kind != "text":
            out.append(("text.format", f"text.format type {kind!r} is not supported (only 'text')"))
        if self.previous_response_id:
            out.append(("previous_response_id", "responses are not stored; send the whole conversation"))
        return out

    def messages(self) -> list[dict[str, str]]:
        """Chat-template messages: instructions as a system message, then the input."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        return [*out, *(m.for_template() for m in self.input)]


# ---- routes ↔ replica: what `LLMServer.generate` takes and streams -----------------------------------
TopLogprobs = list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, best first
TokenScore = tuple[int, float | None, TopLogprobs | None]  # (token id, its logprob, top alternatives)
PromptScore = tuple[float, TopLogprobs] | None  # a prompt token's logprob and top (None: the first token)


@dataclass(frozen=True)
class GenerationRequest:
    """One API request as the engine sees it: token ids and sampling settings, no HTTP or OpenAI shape.

    Built by the routes after validation and tokenization, so everything here is already checked.
    """

    prompts: list[list[int]]
    max_tokens: list[int]  # one per prompt; 0 = score the prompt only (echo)
    n: int = 1  # choices per prompt: choice `p * n + j` is prompt p's j-th sample
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # choice j samples with seed + j
    stop: list[str] = field(default_factory=list)  # stop strings (not part of the text)
    chat: bool = False  # also stop at the end-of-turn token
    ignore_eos: bool = False  # always generate max_tokens
    stream: bool = True  # False: no chunk before the end
    logprobs: int | None = None  # None: none; k: each token's logprob and the top k
    prompt_logprobs: bool = False  # logprobs of the prompt tokens too (echo scoring)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class ChunkItem:
    """What one choice produced since its last chunk; a chunk (`GenerationChunk`) has one per choice."""

    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None  # "stop" or "length" on the choice's last item
    logprobs: list[TokenScore] = field(default_factory=list)  # one per token, when asked
    prompt_logprobs: list[PromptScore] | None = None  # once, in the choice's first item, when asked

    def add(self, later: ChunkItem) -> None:
        """Append a later item of the same choice (a non-streaming response merges them all)."""
        self.text += later.text
        self.tokens += later.tokens
        self.logprobs += later.logprobs
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs
        if later.finish_reason:
            self.finish_reason = later.finish_reason


GenerationChunk = list[ChunkItem]
