"""Iteration-level (continuous) batching for a Hugging Face causal LM, on a preallocated slot KV cache.

One thread owns the model and a `SlotKVCache` of `max_batch_size` slots × the model's context. Each
iteration (an engine *step*) it
1. drops sequences whose clients went away (or hit a stop string) and frees their slots,
2. gives waiting sequences the lowest free slots,
3. prefills: one forward over the next prompt chunk of every sequence still prefilling, at most
   `prefill_chunk_tokens` tokens in all (0 = whole prompts at once); a sequence whose prompt is done
   samples its first token. While others decode, newcomers wait up to `max_prefill_delay_steps`
   steps so that several share one prefill forward (unless as many wait as decode),
4. decodes: one forward of one token for every decoding slot, in place in the cache,
5. hands every output of the step to `deliver` in one call.

Chunked prefill keeps running streams producing a token every step while a long prompt arrives: the
prompt costs a few chunk-sized forwards spread over steps instead of one long stall. Why delay
newcomers: a small model's forward costs about the same for 1 token or 30 (per-op overhead), so a
prefill forward per arrival would halve decode throughput under steady load (profiled: 43% of the
engine thread in prefill at 16 clients); TGI's `max_waiting_tokens` makes the same trade.

Why a thread and not asyncio: a forward pass blocks for milliseconds; in its own thread the caller
(the engine process's pipe reader, `serve.engine_process`) keeps taking submits and cancels while the
model computes. Served, the engine runs in a process of its own, not in the replica: its Python-heavy
steps need the GIL almost all the time (see `serve.engine_process`).
Why our own loop and not `generate`: measured on this CPU, a padded static batch
is ~6-10x faster than one request at a time, and transformers' `generate_batch` was slower than both.

Every tensor is created on the model's device and the cache takes the model's dtype, so the same code
runs on CPU (fp32) and GPU (bf16). A row's logits depend only on its own slot (see `slot_mask`), so
batch neighbours never change a result beyond float summation order.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from serve.kv_cache import SlotKVCache, StepPlan, slot_mask
from serve.protocol import PromptScore, TopLogprobs
from serve.sampling import SamplingParams, sample_next, token_logprobs

log = logging.getLogger(__name__)


def check_fits(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """A sequence needs a prompt token, and prompt + new tokens within the model's context."""
    if prompt_len + max_new_tokens > context or not prompt_len:
        raise ValueError(f"prompt + max_new_tokens must be 1..{context} tokens")


@dataclass(eq=False)
class Sequence:
    """One sequence to generate: the prompt, its limits, what to report and whom it belongs to."""

    prompt_ids: list[int]
    max_new_tokens: int  # 0: prompt logprobs only (echo scoring), no token generated
    stop_token_ids: frozenset[int]
    params: SamplingParams
    owner: Any = None  # opaque to the engine: lets `deliver` route outputs (a request, a test's list)
    index: int = 0  # choice index within the owner
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob and the top k
    prompt_logprobs: bool = False  # logprob (and top `logprobs`) of every prompt token after the first
    generated: int = 0
    prefilled: int = field(default=0, repr=False)
    last_token: int = field(default=-1, repr=False)
    slot: int = field(default=-1, repr=False)
    admitted_step: int = field(default=0, repr=False)
    prompt_scores: list[PromptScore] = field(default_factory=list, repr=False)

    def accept(self, token: int) -> str | None:
        """Record `token`; return why the sequence ends with it, if it does."""
        self.generated += 1
        self.last_token = token
        if token in self.stop_token_ids:
            return "stop"
        if self.generated >= self.max_new_tokens:
            return "length"
        return None

    @property
    def decoding(self) -> bool:
        return self.generated > 0


@dataclass
class Output:
    """What one sequence produced in one step. `token` None: no token (error, or prompt-only echo)."""

    seq: Sequence
    token: int | None
    finish_reason: str | None  # None, "stop", "length" or "error"
    logprob: float | None = None
    top: TopLogprobs | None = None
    prompt_logprobs: list[PromptScore] | None = None


Deliver = Callable[[list[Output]], None]


def context_of(model: PreTrainedModel) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__} from its config")


class BatchEngine:
    """Owns the model, the slots and the KV cache; thread-safe `submit` / `cancel`."""

    def __init__(
        self,
        model: PreTrainedModel,
        pad_token_id: int,
        max_batch_size: int,
        deliver: Deliver,
        prefill_chunk_tokens: int = 0,
        context: int | None = None,
        max_prefill_delay_steps: int = 0,
    ) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.deliver = deliver
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_prefill_delay_steps = max_prefill_delay_steps
        self.context = context or context_of(model)
        self.cache = SlotKVCache(model.config.num_hidden_layers, max_batch_size, self.context)
        self._slot_ids = torch.arange(max_batch_size, device=self.device)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[Sequence] = set()
        self._slots: list[Sequence | None] = [None] * max_batch_size
        self._prefilling: list[Sequence] = []  # in slots, prompt not yet fully in the cache
        self._stopping = False
        self.steps = 0
        self.step_s = 0.0  # moving average of a step's duration (for the stream interval)
        self.running = 0  # sequences holding a slot
        self.cancelled = 0  # sequences removed before they finished (client gone, stop string)
        self.peak_running = 0  # most slots held at once since the last `stats(reset_peak=True)`
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raylm-batch-engine", daemon=True)

    # ---- API used from the replica's event loop -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            check_fits(len(seq.prompt_ids), seq.max_new_tokens, self.context)
        with self._cv:
            self._waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Free the slots of `seqs` at the next step (client gone, or a stop string matched)."""
        with self._cv:
            self._cancelled.update(seqs)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self, reset_peak: bool = False) -> dict[str, int]:
        with self._cv:
            out = {
                "running": self.running,
                "waiting": len(self._waiting),
                "steps": self.steps,
                "cancelled": self.cancelled,
                "peak_running": self.peak_running,
                "thread_id": self._thread.native_id or 0,  # lets a benchmark read the thread's CPU time
            }
            if reset_peak:
                self.peak_running = self.running
            return out

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while (
                        not self._stopping and not self._waiting and not self.running and not self._cancelled
                    ):
                        self._cv.wait()
                    if self._stopping:
                        return
                    self._drop(self._cancelled)
                    self._cancelled = set()
                    self._admit()
                started = time.perf_counter()
                outputs: list[Output] = []
                try:
                    decoding = sum(1 for s in self._slots if s is not None and s.decoding)
                    if self._prefilling and self._prefill_due(decoding):
                        self._prefill(outputs)
                    if any(s is not None and s.decoding for s in self._slots):
                        self._decode(outputs)
                except Exception as exc:  # a failed step must not kill the replica: fail its sequences
                    log.exception("engine step failed; failing %d sequences", self.running)
                    self.error = exc
                    failed = {o.seq for o in outputs if o.finish_reason is not None}
                    outputs += [Output(s, None, "error") for s in self._slots if s and s not in failed]
                    with self._cv:
                        self._slots = [None] * self.max_batch_size
                        self._prefilling, self.running = [], 0
                self.step_s = 0.9 * self.step_s + 0.1 * (time.perf_counter() - started)
                if outputs:
                    self.deliver(outputs)

    def _drop(self, cancelled: set[Sequence]) -> None:
        """(Lock held.) Forget cancelled sequences: out of the queue, out of their slots."""
        if not cancelled:
            return
        before = len(self._waiting)
        self._waiting = collections.deque(s for s in self._waiting if s not in cancelled)
        self.cancelled += before - len(self._waiting)
        for seq in cancelled:
            if 0 <= seq.slot < self.max_batch_size and self._slots[seq.slot] is seq:
                self._release(seq)
                self.cancelled += 1
        self._prefilling = [s for s in self._prefilling if s.slot >= 0]

    def _admit(self) -> None:
        """(Lock held.) Waiting sequences take the lowest free slots, so decode batches stay dense."""
        for slot, holder in enumerate(self._slots):
            if not self._waiting:
                break
            if holder is None:
                seq = self._waiting.popleft()
                seq.slot, self._slots[slot] = slot, seq
                seq.admitted_step = self.steps
                self._prefilling.append(seq)
                self.running += 1
        self.peak_running = max(self.peak_running, self.running)

    def _release(self, seq: Sequence) -> None:
        if self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
            self.running -= 1
        seq.slot = -1

    def _finish(self, seq: Sequence) -> None:
        with self._cv:
            self._release(seq)
            if seq in self._prefilling:
                self._prefilling.remove(seq)

    def _prefill_due(self, decoding: int) -> bool:
        """Prefill now, or let newcomers gather for a shared prefill forward while others decode?"""
        if not decoding or len(self._prefilling) >= decoding:
            return True
        if any(s.prefilled for s in self._prefilling):  # a chunked prompt in progress: keep its pace
            return True
        return self.steps - min(s.admitted_step for s in self._prefilling) >= self.max_prefill_delay_steps

    def _prefill(self, outputs: list[Output]) -> None:
        """One forward over the next chunk of every prefilling prompt (left-padded: last token last)."""
        budget = self.prefill_chunk_tokens or self.context * self.max_batch_size
        chunks: list[tuple[Sequence, int, int]] = []  # (sequence, first position, length)
        for seq in self._prefilling:
            if budget <= 0:
                break
            length = min(len(seq.prompt_ids) - seq.prefilled, budget)
            chunks.append((seq, seq.prefilled, length))
            budget -= length
        width_q = max(n for _, _, n in chunks)
        ids, positions = [], []
        for seq, start, n in chunks:
            ids.append([self.pad_token_id] * (width_q - n) + seq.prompt_ids[start : start + n])
            positions.append([-1] * (width_q - n) + list(range(start, start + n)))
        slots = torch.tensor([seq.slot for seq, _, _ in chunks], device=self.device)
        query_pos = torch.tensor(positions, device=self.device)
        width = max(start + n for _, start, n in chunks)
        write = query_pos.masked_fill(query_pos < 0, self.cache.scratch)
        self.cache.plan = StepPlan(rows=slots, slots=slots, write=write, width=width)
        scored = any(seq.prompt_logprobs for seq, _, _ in chunks)
        out = self.model(
            input_ids=torch.tensor(ids, device=self.device),
            attention_mask=slot_mask(query_pos, width, self.dtype),
            position_ids=query_pos.clamp(min=0),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=0 if scored else 1,
        )
        done = []
        for row, (seq, start, n) in enumerate(chunks):
            seq.prefilled += n
            if seq.prompt_logprobs:
                self._score_prompt(seq, out.logits[row, width_q - n :], start, n)
            if seq.prefilled == len(seq.prompt_ids):
                done.append(row)
        with self._cv:
            self._prefilling = [s for s in self._prefilling if s.prefilled < len(s.prompt_ids)]
        if done:
            self._first_tokens([chunks[r][0] for r in done], out.logits[done, -1, :], outputs)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, start: int, n: int) -> None:
        """Logprob of each prompt token given the ones before it (the first token has none)."""
        if start == 0:
            seq.prompt_scores.append(None)
        targets = seq.prompt_ids[start + 1 : start + n + 1]
        if targets:
            chosen, top = token_logprobs(logits[: len(targets)], targets, seq.logprobs or 0)
            seq.prompt_scores += list(zip(chosen, top, strict=True))

    def _first_tokens(self, seqs: list[Sequence], logits: torch.Tensor, outputs: list[Output]) -> None:
        prompt_only = [s for s in seqs if s.max_new_tokens == 0]
        for seq in prompt_only:
            outputs.append(Output(seq, None, "length", prompt_logprobs=seq.prompt_scores))
            self._finish(seq)
        rows = [i for i, s in enumerate(seqs) if s.max_new_tokens > 0]
        if rows:
            self._emit([seqs[i] for i in rows], logits[rows], outputs)

    def _decode(self, outputs: list[Output]) -> None:
        """One token for every decoding slot, in place; slots that are free or prefilling idle."""
        hi = max(i for i, s in enumerate(self._slots) if s is not None and s.decoding) + 1
        ids, positions, rows = [self.pad_token_id] * hi, [-1] * hi, []
        for i, seq in enumerate(self._slots[:hi]):
            if seq is not None and seq.decoding:
                ids[i] = seq.last_token
                positions[i] = len(seq.prompt_ids) + seq.generated - 1
                rows.append(i)
        query_pos = torch.tensor(positions, device=self.device)[:, None]
        width = max(positions) + 1
        write = query_pos.masked_fill(query_pos < 0, self.cache.scratch)
        self.cache.plan = StepPlan(rows=slice(0, hi), slots=self._slot_ids[:hi], write=write, width=width)
        out = self.model(
            input_ids=torch.tensor(ids, device=self.device)[:, None],
            attention_mask=slot_mask(query_pos, width, self.dtype),
            position_ids=query_pos.clamp(min=0),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.steps += 1
        logits = out.logits[:, -1, :]
        if len(rows) < hi:
            logits = logits[rows]
        self._emit([self._slots[i] for i in rows], logits, outputs)  # type: ignore[misc]

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor, outputs: list[Output]) -> None:
        """Sample one token per sequence, report it (with logprobs when asked), retire finished ones."""
        tokens = sample_next(logits, [s.params for s in seqs])
        wanted = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        scores: dict[int, tuple[float, TopLogprobs]] = {}
        if wanted:
            k = max(seqs[i].logprobs or 0 for i in wanted)
            chosen, top = token_logprobs(logits[wanted], [tokens[i] for i in wanted], k)
            scores = {i: (c, t[: seqs[i].logprobs]) for i, c, t in zip(wanted, chosen, top, strict=True)}
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            reason = seq.accept(token)
            logprob, top_k = scores.get(i, (None, None))
            first = seq.generated == 1 and seq.prompt_logprobs
            outputs.append(Output(seq, token, reason, logprob, top_k, seq.prompt_scores if first else None))
            if reason is not None:
                self._finish(seq)
