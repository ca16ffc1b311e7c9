"""`LLMServer`: a loaded HF folder and its batch engine, streaming each request's tokens as text chunks.

The OpenAI routes (`serve.ingress.OpenAIServer`) subclass it, so an HTTP request and the model share
one replica: a token goes engine process → this event loop → client (straight from the replica's own
port with Serve's direct ingress, else through Serve's proxy), with no handle hop.

Two processes per replica (decoder-only models). The `BatchEngine` runs in a child process
(`serve.engine_process`) with its own GIL; this replica process keeps tokenization, detokenization and
HTTP. Why: a tiny model's decode step is mostly Python, so an engine *thread* in the replica needed
the GIL that the event loop and Serve's threads also hold. Measured by `benchmarks/serve_load.py` on
the 2-core dev machine: a lone stream's engine thread cost 2.45 ms CPU per token in the replica vs
~1.4-1.8 ms alone, the engine and the loop sharing one core. Encoder-decoder models keep the simple
in-process `generate` path (no iteration batching).

Per engine step the child sends ONE pipe message with every output of the step (plain tuples), read
on this event loop (`loop.add_reader`, no thread hop), and `_dispatch` files each output with its
request. A request's coroutine wakes when its chunk is due: its first token at once, then every
`running / stream_max_chunks_per_s` seconds (never later than `stream_interval_max_ms`), a chunk
carrying every token since the last one. So the replica sends about `stream_max_chunks_per_s` chunks
per second however many clients stream. Why a budget even for a lone stream: a chunk costs the
replica's event loop, the Serve proxy and the client a fixed amount of CPU (~2.5-3 ms in all per chunk
on the dev machine, against ~1.4 ms for a decode step of its tiny model), so a stream sent token by
token is paced by that path, not by the model. Detokenization and stop strings run once per chunk,
not per token. When the caller goes away (client disconnect → Serve cancels the request), the
`finally` below cancels its sequences in the engine. If the engine process dies, every open request
fails at once (an error, never a hang) and `check_health` fails, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from serve.engine_process import EngineProcess, SeqSpec, StepOutput, load_model
from serve.protocol import ChunkItem, GenerationChunk, GenerationRequest
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


class _Request:
    """One request's step outputs between `_dispatch` and its response coroutine.

    Its sequences have the consecutive ids `base .. base + choices - 1`, so a choice index is
    `sequence id - base`.
    """

    def __init__(self, base: int, choices: int, streaming: bool) -> None:
        self.base = base
        self.pending: list[StepOutput] = []
        self.open = choices  # sequences not finished yet
        self.streaming = streaming
        self.started = False  # the first chunk (time to first token) never waits for the interval
        self.failed = False  # the engine process died
        self.flushed = time.monotonic()
        self.ready = asyncio.Event()

    def take(self) -> list[StepOutput]:
        outputs, self.pending, self.flushed = self.pending, [], time.monotonic()
        self.started = True
        return outputs


class LLMServer:
    """One model replica: a tokenizer and, for decoder-only models, a batch engine in a child process
    (encoder-decoder models: the model itself, served with `generate`)."""

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
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, config))
        self.chat_stop_ids = frozenset(self.eos_ids | chat_stop_token_ids(self.tokenizer))
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(self.eos_ids), 0)
        self.max_chunks_per_s = stream_max_chunks_per_s
        self.interval_max_s = stream_interval_max_ms / 1000
        self.chunks_sent = 0  # SSE-bound chunks handed out (benchmarks read chunks/s and tokens/chunk)
        self.tokens_sent = 0
        self.engine: EngineProcess | None = None
        self.model: Any = None
        self._owners: dict[int, _Request] = {}  # sequence id -> its request, while the request runs
        self._next_id = 0  # sequence ids: a request takes `choices` consecutive ones
        self._generate_lock = threading.Lock()
        if self.encoder_decoder:
            self.model = load_model(model_path, encoder_decoder=True)
            where = f"in-process on {self.model.device}"
        else:
            self.engine = EngineProcess(
                model_path,
                pad,
                torch_threads,
                self._dispatch,
                self._engine_died,
                max_batch_size=max_batch_size,
                prefill_chunk_tokens=prefill_chunk_tokens,
                max_prefill_delay_steps=max_prefill_delay_steps,
            )
            where = f"engine process pid {self.engine.pid}"
        log.info("LLMServer loaded %s (%s)", model_path, where)

    # ---- engine process → event loop --------------------------------------------------------------
    def chunk_period(self) -> float:
        """Seconds between one stream's chunks: the replica's chunk budget shared by its streams."""
        assert self.engine is not None
        return min(self.interval_max_s, max(1, self.engine.running) / self.max_chunks_per_s)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        """Event loop, once per engine step: file each output with its request; wake the requests
        whose chunk is due."""
        touched: dict[_Request, None] = {}
        owners = self._owners
        for out in outputs:
            req = owners.get(out[0])
            if req is None:  # its request already ended (stop string, disconnect)
                continue
            req.pending.append(out)
            if out[2] is not None:
                req.open -= 1
            touched[req] = None
        assert self.engine is not None
        # Due at the step nearest the period (half a step early), so tokens are not held a step more.
        period, now, half_step = self.chunk_period(), time.monotonic(), self.engine.step_s / 2
        for req in touched:
            due = req.streaming and (not req.started or now - req.flushed + half_step >= period)
            if req.open == 0 or due:
                req.ready.set()

    def _engine_died(self) -> None:
        """Event loop: the engine process is gone; every open request ends with an error now."""
        for req in set(self._owners.values()):
            req.failed = True
            req.ready.set()

    # ---- requests ---------------------------------------------------------------------------------
    def _specs(self, request: GenerationRequest, base: int) -> tuple[list[SeqSpec], list[ChoiceText]]:
        stop_ids = self.chat_stop_ids if request.chat else self.eos_ids
        if request.ignore_eos:
            stop_ids = frozenset()
        stop = tuple(stop_ids)
        specs: list[SeqSpec] = []
        choices: list[ChoiceText] = []
        seed = request.seed
        for prompt, max_tokens in zip(request.prompts, request.max_tokens, strict=True):
            for j in range(request.n):
                specs.append(
                    (
                        base + len(specs),
                        prompt,
                        max_tokens,
                        stop,
                        request.temperature,
                        request.top_p,
                        request.top_k,
                        None if seed is None else seed + j,
                        request.logprobs,
                        request.prompt_logprobs,
                    )
                )
                detok = IncrementalDetokenizer(self.tokenizer, prompt)
                choices.append(ChoiceText(detok, list(request.stop), stop_ids))
        return specs, choices

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream a request's chunks: each a list of `ChunkItem`s, one per choice that moved on.

        A non-streaming request (`request.stream` False) gets its chunks only once every choice ended.
        """
        if self.encoder_decoder:
            yield await self._generate_seq2seq(request)
            return
        assert self.engine is not None
        self.engine.attach(asyncio.get_running_loop())
        base, self._next_id = self._next_id, self._next_id + request.choices
        req = _Request(base, request.choices, request.stream)
        specs, choices = self._specs(request, base)
        self.engine.submit(specs)
        ids = range(base, base + len(specs))
        for sid in ids:
            self._owners[sid] = req
        open_choices = set(range(len(specs)))
        try:
            while open_choices:
                await req.ready.wait()
                req.ready.clear()
                if req.failed:
                    raise RuntimeError("the engine process died")
                chunk = self._chunk(req, request.logprobs is not None, choices, open_choices)
                if chunk:
                    self.chunks_sent += 1
                    yield chunk
        finally:
            for sid in ids:
                self._owners.pop(sid, None)
            if open_choices:
                self.engine.cancel([base + i for i in open_choices])

    def _chunk(
        self, req: _Request, logprobs: bool, choices: list[ChoiceText], open_choices: set[int]
    ) -> GenerationChunk:
        """Turn one flush of step outputs into chunk items: one detokenization per choice."""
        by_choice: dict[int, list[StepOutput]] = {}
        for out in req.take():
            by_choice.setdefault(out[0] - req.base, []).append(out)
        chunk = []
        for index, outs in by_choice.items():
            if index not in open_choices:
                continue
            reason = outs[-1][2]
            if reason == "error":
                raise RuntimeError("generation failed in the batch engine")
            choice, before = choices[index], choices[index].tokens
            tokens = [o[1] for o in outs if o[1] is not None]
            text = choice.extend(tokens, reason)
            item = ChunkItem(index, text, choice.tokens - before)
            self.tokens_sent += item.tokens
            if logprobs:
                scores = [(o[1], o[3], o[4]) for o in outs if o[1] is not None]
                item.logprobs = scores[: item.tokens]
            item.prompt_logprobs = next((o[5] for o in outs if o[5] is not None), None)
            if choice.finish_reason is not None:
                item.finish_reason = choice.finish_reason
                open_choices.discard(index)
                if reason is None:  # a stop string ended it: the engine still runs it
                    assert self.engine is not None
                    self.engine.cancel([req.base + index])
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

    async def stats(self, reset_peak: bool = False) -> dict[str, int]:
        """Engine counters (running, waiting, steps, cancelled, peak_running, thread_id), the pids of
        this replica process and its engine process (`replica_pid`, `engine_pid`), chunks/tokens sent."""
        if self.engine is None:
            return {}
        return {
            **await self.engine.stats(reset_peak),
            "replica_pid": os.getpid(),
            "engine_pid": self.engine.pid,
            "chunks_sent": self.chunks_sent,
            "tokens_sent": self.tokens_sent,
        }

    def check_health(self) -> None:
        if self.engine is not None and not self.engine.alive:
            raise RuntimeError(f"the engine process (pid {self.engine.pid}) is not running")

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
