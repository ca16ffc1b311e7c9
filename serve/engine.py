"""Iteration-level (continuous) batching for a Hugging Face causal LM.

One thread owns the running batch and its KV cache. Each iteration it
1. drops sequences whose clients went away (or hit a stop string),
2. prefills the newcomers together (left-padded) and samples their first token,
3. merges their KV cache into the running cache (left padding + attention mask, explicit positions),
4. runs one decode step for every running sequence and retires the finished ones
   (`index_select` on the batch dimension; columns that became padding for every row are trimmed).

Why a thread and not asyncio: a forward pass blocks for milliseconds; in its own thread (torch releases
the GIL inside kernels) the replica's event loop keeps accepting requests and streaming tokens while
the model computes. Why our own loop and not `generate`: measured on this CPU, a padded static batch
is ~10x faster than one request at a time, and transformers' `generate_batch` was slower than both;
iteration-level batching gets the static batch's throughput without making anyone wait for a batch.

Padding never changes a result: padded key/value slots are zeroed and masked, positions are explicit
per row, so a row's logits depend only on its own tokens (up to float summation order).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from serve.sampling import SamplingParams, sample_next

log = logging.getLogger(__name__)

# emit(token_id, finish_reason): called from the engine thread for every generated token;
# finish_reason is None, "stop" (a stop token) or "length" (max_new_tokens reached); token_id is -1
# with finish_reason "error" when the batch failed.
Emit = Callable[[int, str | None], None]


@dataclass(eq=False)
class Sequence:
    """One sequence to generate: the prompt, its limits and where its tokens go."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    params: SamplingParams
    emit: Emit
    generated: int = 0
    last_token: int = field(default=-1, repr=False)

    def accept(self, token: int) -> str | None:
        """Record `token`; return why the sequence ends with it, if it does."""
        self.generated += 1
        self.last_token = token
        if token in self.stop_token_ids:
            return "stop"
        if self.generated >= self.max_new_tokens:
            return "length"
        return None


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left of `dim` up to `length` (dim -1 for masks, -2 for key/value)."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


class BatchEngine:
    """Owns the model, the running batch and its KV cache; thread-safe `submit` / `cancel`."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int, max_batch_size: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[Sequence] = set()
        self._running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cache_len], 1 = real token
        self._stopping = False
        self.steps = 0
        self.cancelled = 0  # sequences removed before they finished (client gone, stop string)
        self.peak_running = 0  # largest batch since the last `stats(reset_peak=True)`
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raylm-batch-engine", daemon=True)

    # ---- API used from the replica's event loop -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            self._waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Free the slots of `seqs` at the next iteration (client gone, or a stop string matched)."""
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
                "running": len(self._running),
                "waiting": len(self._waiting),
                "steps": self.steps,
                "cancelled": self.cancelled,
                "peak_running": self.peak_running,
            }
            if reset_peak:
                self.peak_running = len(self._running)
            return out

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stopping:
                        return
                    cancelled, self._cancelled = self._cancelled, set()
                    if cancelled:
                        before = len(self._waiting)
                        self._waiting = collections.deque(s for s in self._waiting if s not in cancelled)
                        self.cancelled += before - len(self._waiting)
                    free = self.max_batch_size - (len(self._running) - len(cancelled & set(self._running)))
                    newcomers = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                try:
                    if cancelled:
                        keep = [i for i, s in enumerate(self._running) if s not in cancelled]
                        self.cancelled += len(self._running) - len(keep)
                        self._keep(keep)
                    if newcomers:
                        self._admit(newcomers)
                    if self._running:
                        self._decode()
                except Exception as exc:  # a failed step must not kill the replica: fail its sequences
                    log.exception("batch step failed; failing %d sequences", len(self._running))
                    self.error = exc
                    for seq in [*self._running, *newcomers]:
                        seq.emit(-1, "error")
                    self._running, self._cache, self._mask = [], None, None

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` as one left-padded batch, sample their first token, merge survivors."""
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        tokens = sample_next(out.logits[:, -1, :], [s.params for s in seqs])
        keep = []
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            reason = seq.accept(token)
            seq.emit(token, reason)
            if reason is None:
                keep.append(row)
        if not keep:
            return
        real = mask.bool()[:, None, :, None]
        for layer in cache.layers:  # zero the padded slots so garbage there can never leak (0 * NaN)
            layer.keys = layer.keys.masked_fill(~real, 0.0)
            layer.values = layer.values.masked_fill(~real, 0.0)
        if len(keep) < len(seqs):
            idx = torch.tensor(keep)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
            mask = mask.index_select(0, idx)
        self._merge(cache, mask, [seqs[i] for i in keep])

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[Sequence]) -> None:
        """Append the newcomers' rows to the running batch, left-padding whichever cache is shorter."""
        if self._cache is None:
            self._cache, self._mask, self._running = cache, mask, seqs
            self.peak_running = max(self.peak_running, len(seqs))
            return
        assert self._mask is not None
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length, -2), _pad_left(new.keys, length, -2)])
            old.values = torch.cat([_pad_left(old.values, length, -2), _pad_left(new.values, length, -2)])
        self._mask = torch.cat([_pad_left(self._mask, length, -1), _pad_left(mask, length, -1)])
        self._running = self._running + seqs
        self.peak_running = max(self.peak_running, len(self._running))

    def _decode(self) -> None:
        """One token for every running sequence; retire those that finished."""
        assert self._mask is not None
        ids = torch.tensor([[s.last_token] for s in self._running], dtype=torch.long)
        mask = F.pad(self._mask, (0, 1), value=1)
        positions = mask.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True
        )
        self._mask = mask
        self.steps += 1
        tokens = sample_next(out.logits[:, -1, :], [s.params for s in self._running])
        keep = []
        for row, (seq, token) in enumerate(zip(self._running, tokens, strict=True)):
            reason = seq.accept(token)
            seq.emit(token, reason)
            if reason is None:
                keep.append(row)
        if len(keep) < len(self._running):
            self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        """Shrink the batch to `rows`, dropping cache columns that are padding for every survivor."""
        if not rows:
            self._running, self._cache, self._mask = [], None, None
            return
        assert self._cache is not None and self._mask is not None
        idx = torch.tensor(rows)
        mask = self._mask.index_select(0, idx)
        first_real = int(mask.any(0).int().argmax())
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first_real:]
            layer.values = layer.values.index_select(0, idx)[:, :, first_real:]
        self._mask = mask[:, first_real:]
        self._running = [self._running[i] for i in rows]
