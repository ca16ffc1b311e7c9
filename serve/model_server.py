"""`LLMServer`: the model deployment. Loads a HF folder and streams tokens out of the batching engine.

The ingress sends token ids (it tokenizes, so it can enforce limits without a model call); this replica
turns generated ids back into text (incremental detokenization, stop strings) and yields, per chunk,
the new text of every choice of one request. All sequences of a request (several prompts, n > 1) ride
in the same running batch. When the caller goes away (client disconnect → Serve cancels the request
down the handle chain), the `finally` below frees the sequences' batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from serve.engine import BatchEngine, Sequence
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


def _chunk_item(index: int) -> dict[str, Any]:
    return {"index": index, "text": "", "tokens": 0, "finish_reason": None}


class LLMServer:
    """One model replica: a loaded HF model, its tokenizer and (for decoder-only models) a batch engine."""

    def __init__(self, model_path: str, max_batch_size: int, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        auto = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
        # fp32 on CPU: exact padding math and no near-tie flips between batch sizes.
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model = auto.from_pretrained(
            model_path, dtype=dtype, local_files_only=True, use_safetensors=True  # never unpickle weights
        ).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, config))
        self.chat_stop_ids = frozenset(self.eos_ids | chat_stop_token_ids(self.tokenizer))
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(self.eos_ids), 0)
        self.engine: BatchEngine | None = None
        self._generate_lock = threading.Lock()
        if not self.encoder_decoder:
            self.engine = BatchEngine(self.model, pad, max_batch_size)
            self.engine.start()
        log.info("LLMServer loaded %s (%s)", model_path, type(self.model).__name__)

    def _choice_text(
        self, prompt: list[int], request: dict[str, Any], stop_ids: frozenset[int]
    ) -> ChoiceText:
        return ChoiceText(IncrementalDetokenizer(self.tokenizer, prompt), list(request["stop"]), stop_ids)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """Stream chunks `[{"index", "text", "tokens", "finish_reason"}, ...]` for every choice of a request.

        `request`: prompts (token id lists), n, max_tokens (one per prompt), temperature, top_p, top_k,
        seed, stop (strings), chat (bool: also stop at the end-of-turn token), ignore_eos.
        """
        if self.encoder_decoder:
            yield await self._generate_seq2seq(request)
            return
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, int, str | None]] = asyncio.Queue()
        stop_ids = self.chat_stop_ids if request.get("chat") else self.eos_ids
        if request.get("ignore_eos"):
            stop_ids = frozenset()
        seqs: list[Sequence] = []
        choices: list[ChoiceText] = []
        n, seed = request["n"], request.get("seed")
        for p, (prompt, max_tokens) in enumerate(zip(request["prompts"], request["max_tokens"], strict=True)):
            for j in range(n):
                params = SamplingParams(
                    temperature=request["temperature"],
                    top_p=request["top_p"],
                    top_k=request["top_k"],
                    seed=None if seed is None else seed + j,
                )

                def emit(token: int, reason: str | None, index: int = p * n + j) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, token, reason))

                seqs.append(Sequence(prompt, max_tokens, stop_ids, params, emit))
                choices.append(self._choice_text(prompt, request, stop_ids))
        self.engine.submit(seqs)
        open_choices = set(range(len(seqs)))
        try:
            while open_choices:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                chunk: dict[int, dict[str, Any]] = {}
                for index, token, reason in events:
                    if index not in open_choices:
                        continue
                    if reason == "error":
                        raise RuntimeError("generation failed in the batch engine")
                    choice = choices[index]
                    out = chunk.setdefault(index, _chunk_item(index))
                    out["text"] += choice.push(token, reason)
                    out["tokens"] += 1
                    if choice.finish_reason is not None:
                        out["finish_reason"] = choice.finish_reason
                        open_choices.discard(index)
                        if reason is None:  # a stop string ended it: the engine still runs it
                            self.engine.cancel([seqs[index]])
                if chunk:
                    yield list(chunk.values())
        finally:
            if open_choices:
                self.engine.cancel([seqs[i] for i in open_choices])

    async def _generate_seq2seq(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Encoder-decoder models: one `generate` call per sequence (simple path, no iteration batching)."""
        chunk = []
        n, seed = request["n"], request.get("seed")
        for p, (prompt, max_tokens) in enumerate(zip(request["prompts"], request["max_tokens"], strict=True)):
            for j in range(n):
                sequence_seed = None if seed is None else seed + j
                ids = await asyncio.to_thread(self._seq2seq_once, prompt, max_tokens, request, sequence_seed)
                choice = self._choice_text([], request, self.eos_ids)
                item = _chunk_item(p * n + j)
                for k, token in enumerate(ids):
                    reason = None
                    if k == len(ids) - 1:  # generate ended here: at eos, or at the length limit
                        reason = "length" if token not in self.eos_ids and len(ids) >= max_tokens else "stop"
                    item["text"] += choice.push(token, reason)
                    if choice.finish_reason is not None:
                        break
                item["tokens"], item["finish_reason"] = choice.tokens, choice.finish_reason or "stop"
                chunk.append(item)
        return chunk

    def _seq2seq_once(
        self, prompt: list[int], max_tokens: int, request: dict[str, Any], seed: int | None
    ) -> list:
        sample = request["temperature"] > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample}
        if sample:
            top_k = request["top_k"] or None
            kwargs.update(temperature=request["temperature"], top_p=request["top_p"], top_k=top_k)
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
        """Engine counters: running, waiting, steps, cancelled, peak_running (freed slots, real batching)."""
        return self.engine.stats(reset_peak) if self.engine else {}

    def check_health(self) -> None:
        if self.engine is not None and not self.engine.alive:
            raise RuntimeError("batch engine thread is not running")

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
