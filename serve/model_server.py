"""`LLMServer`: a loaded HF folder and its batch engine, streaming each request's tokens as text chunks.

The OpenAI routes (`serve.ingress.OpenAIServer`) subclass it, so an HTTP request and the model share
one replica: a token goes engine thread → this event loop → Serve proxy → client, with no handle hop.

Per engine step the engine makes one call (`_deliver`), which crosses to the event loop once and
hands each request the outputs of all its sequences. A request's coroutine wakes when its chunk is
due: its first token at once, then every `running / stream_max_chunks_per_s` seconds (never later
than `stream_interval_max_ms`), a chunk carrying every token since the last one. So the replica
sends about `stream_max_chunks_per_s` chunks per second however many clients stream. Why a budget
even for a lone stream: a chunk costs the replica's event loop, the Serve proxy and the client a
fixed amount of CPU (measured by `benchmarks/serve_load.py`: ~2.5-3 ms in all per chunk on the
2-core dev machine, against ~1.4 ms for a decode step of its tiny model), so a stream sent token by
token is paced by that path, not by the model, and its event-loop work takes the GIL from the
engine thread. Detokenization and stop strings run once per chunk, not per token. When the caller
goes away (client disconnect → Serve cancels the request), the `finally` below frees the slots.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from serve.engine import BatchEngine, Output, Sequence
from serve.protocol import ChunkItem, GenerationChunk, GenerationRequest
from serve.sampling import SamplingParams
from serve.text import ChoiceText, IncrementalDetokenizer

log = logging.getLogger("ray.serve")

END_OF_TURN = "<|end|>"


def chat_stop_token_ids(tokenizer: Any) -> set[int]:
    """End-of-turn tokens that end an assistant reply, besides eos (raylm's `<|end|>` when present)."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return {token_id}
    return set()


def eos_token_ids(tokenizer: Any, config: Any) -> set[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present (fp32 on CPU: exact padding math, no near-tie flips)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class _Request:
    """One request's outputs between the engine thread's `_deliver` and its response coroutine."""

    def __init__(self, choices: int, streaming: bool) -> None:
        self.pending: list[Output] = []
        self.open = choices  # sequences not finished yet
        self.streaming = streaming
        self.started = False  # the first chunk (time to first token) never waits for the interval
        self.flushed = time.monotonic()
        self.ready = asyncio.Event()

    def take(self) -> list[Output]:
        outputs, self.pending, self.flushed = self.pending, [], time.monotonic()
        self.started = True
        return outputs


class LLMServer:
    """One model replica: a loaded HF model, its tokenizer and (for decoder-only models) a batch engine."""

    def __init__(
        self,
        model_path: str,
        max_batch_size: int,
        torch_threads: int,
        *,
        prefill_chunk_tokens: int = 128,
        max_prefill_delay_steps: int = 4,
        stream_max_chunks_per_s: float = 200.0,
        stream_interval_max_ms: float = 100.0,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        auto = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
        device, dtype = pick_device()
        self.model = auto.from_pretrained(
            model_path,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,  # never unpickle weights
        ).eval()
        self.model.to(device)
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, config))
        self.chat_stop_ids = frozenset(self.eos_ids | chat_stop_token_ids(self.tokenizer))
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(self.eos_ids), 0)
        self.max_chunks_per_s = stream_max_chunks_per_s
        self.interval_max_s = stream_interval_max_ms / 1000
        self.chunks_sent = 0  # SSE-bound chunks handed out (benchmarks read chunks/s and tokens/chunk)
        self.tokens_sent = 0
        self.engine: BatchEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generate_lock = threading.Lock()
        if not self.encoder_decoder:
            self.engine = BatchEngine(
                self.model,
                pad,
                max_batch_size,
                self._deliver,
                prefill_chunk_tokens=prefill_chunk_tokens,
                max_prefill_delay_steps=max_prefill_delay_steps,
            )
            self.engine.start()
        log.info("LLMServer loaded %s (%s on %s, %s)", model_path, type(self.model).__name__, device, dtype)

    # ---- engine thread → event loop ---------------------------------------------------------------
    def _deliver(self, outputs: list[Output]) -> None:
        """Engine thread: one hop to the event loop per step, whatever the number of requests."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def chunk_period(self) -> float:
        """Seconds between one stream's chunks: the replica's chunk budget shared by its streams."""
        assert self.engine is not None
        return min(self.interval_max_s, max(1, self.engine.running) / self.max_chunks_per_s)

    def _dispatch(self, outputs: list[Output]) -> None:
        """Event loop: file each output with its request; wake the requests whose chunk is due."""
        touched: dict[_Request, None] = {}
        for out in outputs:
            req: _Request = out.seq.owner
            req.pending.append(out)
            if out.finish_reason is not None:
                req.open -= 1
            touched[req] = None
        assert self.engine is not None
        # Due at the step nearest the period (half a step early), so tokens are not held a step more.
        period, now, half_step = self.chunk_period(), time.monotonic(), self.engine.step_s / 2
        for req in touched:
            due = req.streaming and (not req.started or now - req.flushed + half_step >= period)
            if req.open == 0 or due:
                req.ready.set()

    # ---- requests ---------------------------------------------------------------------------------
    def _sequences(
        self, request: GenerationRequest, owner: _Request
    ) -> tuple[list[Sequence], list[ChoiceText]]:
        stop_ids = self.chat_stop_ids if request.chat else self.eos_ids
        if request.ignore_eos:
            stop_ids = frozenset()
        seqs: list[Sequence] = []
        choices: list[ChoiceText] = []
        seed = request.seed
        for prompt, max_tokens in zip(request.prompts, request.max_tokens, strict=True):
            for j in range(request.n):
                params = SamplingParams(
                    temperature=request.temperature,
                    top_p=request.top_p,
                    top_k=request.top_k,
                    seed=None if seed is None else seed + j,
                )
                seq = Sequence(
                    prompt,
                    max_tokens,
                    stop_ids,
                    params,
                    owner=owner,
                    index=len(seqs),
                    logprobs=request.logprobs,
                    prompt_logprobs=request.prompt_logprobs,
                )
                seqs.append(seq)
                detok = IncrementalDetokenizer(self.tokenizer, prompt)
                choices.append(ChoiceText(detok, list(request.stop), stop_ids))
        return seqs, choices

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream a request's chunks: each a list of `ChunkItem`s, one per choice that moved on.

        A non-streaming request (`request.stream` False) gets its chunks only once every choice ended.
        """
        if self.encoder_decoder:
            yield await self._generate_seq2seq(request)
            return
        assert self.engine is not None
        self._loop = asyncio.get_running_loop()
        req = _Request(request.choices, request.stream)
        seqs, choices = self._sequences(request, req)
        self.engine.submit(seqs)
        open_choices = set(range(len(seqs)))
        try:
            while open_choices:
                await req.ready.wait()
                req.ready.clear()
                chunk = self._chunk(req.take(), seqs, choices, open_choices)
                if chunk:
                    self.chunks_sent += 1
                    yield chunk
        finally:
            if open_choices:
                self.engine.cancel([seqs[i] for i in open_choices])

    def _chunk(
        self, outputs: list[Output], seqs: list[Sequence], choices: list[ChoiceText], open_choices: set[int]
    ) -> GenerationChunk:
        """Turn one flush of engine outputs into chunk items: one detokenization per choice."""
        by_choice: dict[int, list[Output]] = {}
        for out in outputs:
            by_choice.setdefault(out.seq.index, []).append(out)
        chunk = []
        for index, outs in by_choice.items():
            if index not in open_choices:
                continue
            if outs[-1].finish_reason == "error":
                raise RuntimeError("generation failed in the batch engine")
            choice, before = choices[index], choices[index].tokens
            tokens = [o.token for o in outs if o.token is not None]
            text = choice.extend(tokens, outs[-1].finish_reason)
            item = ChunkItem(index, text, choice.tokens - before)
            self.tokens_sent += item.tokens
            if seqs[index].logprobs is not None:
                scores = [(o.token, o.logprob, o.top) for o in outs if o.token is not None]
                item.logprobs = scores[: item.tokens]
            item.prompt_logprobs = next(
                (o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None
            )
            if choice.finish_reason is not None:
                item.finish_reason = choice.finish_reason
                open_choices.discard(index)
                if outs[-1].finish_reason is None:  # a stop string ended it: the engine still runs it
                    assert self.engine is not None
                    self.engine.cancel([seqs[index]])
            chunk.append(item)
        return chunk

    async def _generate_seq2seq(self, request: GenerationRequest) -> GenerationChunk:
        """Encoder-decoder models: one `generate` call per sequence (simple path, no iteration batching)."""
        chunk = []
        n, seed = request.n, request.seed
        for p, (prompt, max_tokens) in enumerate(zip(request.prompts, request.max_tokens, strict=True)):
            for j in range(n):
                sequence_seed = None if seed is None else seed + j
                ids = await asyncio.to_thread(self._seq2seq_once, prompt, max_tokens, request, sequence_seed)
                choice = ChoiceText(
                    IncrementalDetokenizer(self.tokenizer, []), list(request.stop), self.eos_ids
                )
                item = ChunkItem(p * n + j)
                for k, token in enumerate(ids):
                    reason = None
                    if k == len(ids) - 1:  # generate ended here: at eos, or at the length limit
                        reason = "length" if token not in self.eos_ids and len(ids) >= max_tokens else "stop"
                    item.text += choice.push(token, reason)
                    if choice.finish_reason is not None:
                        break
                item.tokens, item.finish_reason = choice.tokens, choice.finish_reason or "stop"
                chunk.append(item)
        return chunk

    def _seq2seq_once(
        self, prompt: list[int], max_tokens: int, request: GenerationRequest, seed: int | None
    ) -> list:
        sample = request.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample}
        if sample:
            top_k = request.top_k or None
            kwargs.update(temperature=request.temperature, top_p=request.top_p, top_k=top_k)
        with self._generate_lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=torch.tensor([prompt], device=self.model.device), **kwargs)
        ids = out[0].tolist()[1:]  # drop the decoder start token
        pad = self.tokenizer.pad_token_id
        while ids and ids[-1] == pad and pad not in self.eos_ids:
            ids.pop()
        return ids

    def stats(self, reset_peak: bool = False) -> dict[str, int]:
        """Engine counters (running, waiting, steps, cancelled, peak_running) and chunks/tokens sent."""
        if self.engine is None:
            return {}
        return {
            **self.engine.stats(reset_peak),
            "chunks_sent": self.chunks_sent,
            "tokens_sent": self.tokens_sent,
        }

    def check_health(self) -> None:
        if self.engine is not None and not self.engine.alive:
            raise RuntimeError("batch engine thread is not running")

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
