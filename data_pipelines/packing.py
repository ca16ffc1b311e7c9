"""Tokenise in parallel tasks, then de-duplicate and pack in one ordered actor.

Why one ordered packer: packing must be exact across batch boundaries (a block may span documents
from two batches), and exact de-duplication needs one place that has seen every earlier document.
With `DataContext.execution_options.preserve_order = True` and a single actor that runs its calls in
submission order (`allow_out_of_order_execution=False`, which Ray Data turns on by default for its
actors), the packer receives every batch in corpus order, so:
  * the carry buffer makes block boundaries independent of how Ray cut the data into batches;
  * "first occurrence wins" de-duplication is deterministic (same blocks on every run), unlike a
    shared seen-set actor consulted by parallel tasks, where the winner depends on task timing;
  * every execution starts a fresh packer, so re-running a lazy dataset (each epoch, train and val)
    gives identical blocks instead of dropping everything as "already seen".
A groupby on the hash would also be exact, but it shuffles all text through an all-to-all exchange
and loses corpus order. The cost of this design is one set of 8-byte hashes (~70 bytes per unique
document in a Python set: ~0.7 GB per 10 M documents) and a serial stage that only concatenates
arrays, far cheaper than the parallel tokenisation before it.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from tokenizers import Tokenizer

from data_pipelines.stats import CorpusStats, now_ns

_TOKENIZERS: dict[str, Tokenizer] = {}
_PARALLELISM = "TOKENIZERS_PARALLELISM"


def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """One parsed tokenizer per worker process, reused by every task that process runs."""
    tok = _TOKENIZERS.get(tokenizer_json)
    if tok is None:
        _TOKENIZERS.clear()
        tok = _TOKENIZERS[tokenizer_json] = Tokenizer.from_str(tokenizer_json)
    return tok


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Encode on the calling thread only, for the duration of the block.

    A Ray task holds one CPU, and the parallelism comes from running one task per CPU; `tokenizers`
    would otherwise fan every batch out over a Rayon pool as wide as the machine, so N tasks run N×cores
    threads that fight for the same cores (about 10% slower on two cores). The library reads
    TOKENIZERS_PARALLELISM on every call, so the previous value is restored for whatever runs next
    in this pooled worker process.
    """
    previous = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_PARALLELISM]
        else:
            os.environ[_PARALLELISM] = previous


def tokenize_batch(batch: pa.Table, tokenizer_json: str, eos_id: int) -> pa.Table:
    """Ray Data task UDF: cleaned documents → token ids with eos appended (dropped rows get none).

    A stateless task rather than an actor pool: tasks reuse Ray's pooled worker processes and fuse
    with reading and cleaning, while every actor needs a fresh process (seconds each on a busy host).
    The tokenizer travels as its JSON string, so workers on other nodes need no shared filesystem.
    """
    tok = _tokenizer(tokenizer_json)
    eos = np.array([eos_id], dtype=np.int32)
    reasons = batch.column("reason").to_pylist()
    texts = batch.column("text").to_pylist()
    keep = [i for i, r in enumerate(reasons) if not r]
    with _serial_tokenizers():
        encodings = tok.encode_batch_fast([texts[i] for i in keep], add_special_tokens=False)
    lengths = np.zeros(len(texts), dtype=np.int64)
    pieces = []
    for i, enc in zip(keep, encodings, strict=True):
        ids = np.asarray(enc.ids, dtype=np.int32)
        pieces.append(ids)
        pieces.append(eos)
        lengths[i] = len(ids) + 1
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    ids_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
    return pa.table(
        {
            "ids": ids_col,
            "reason": batch.column("reason"),
            "bytes": batch.column("bytes"),
            "clean_bytes": batch.column("clean_bytes"),
            "hash": batch.column("hash"),
        }
    )


class Packer:
    """Ray Data actor UDF (run with concurrency=1, preserve_order): ids → blocks of exactly seq_len.

    Counts everything it sees into CorpusStats and reports a cumulative snapshot to the ledger after
    every batch, so when the stream ends the ledger holds the exact totals, including the tail tokens
    left in the carry buffer (the final partial block, which is dropped).
    """

    def __init__(self, seq_len: int, split: str, dedup: bool, ledger: Any) -> None:
        self.seq_len = seq_len
        self.split = split
        self.dedup = dedup
        self.ledger = ledger
        self.started_ns = now_ns()
        self.seen: set[int] = set()
        self.carry = np.zeros(0, dtype=np.int32)
        self.stats = CorpusStats()
        self.dropped: Counter[str] = Counter()

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        reasons = batch.column("reason").to_pylist()
        hashes = batch.column("hash").to_numpy()
        nbytes = batch.column("bytes").to_numpy()
        clean_bytes = batch.column("clean_bytes").to_numpy()
        ids_col = batch.column("ids").combine_chunks()
        offsets = ids_col.offsets.to_numpy()
        values = ids_col.values.to_numpy(zero_copy_only=False)
        values = values[offsets[0] : offsets[-1]]
        base = offsets[0]
        keep_ranges = []
        s = self.stats
        s.documents_read += len(reasons)
        s.bytes_read += int(nbytes.sum())
        for i, reason in enumerate(reasons):
            if reason:
                self.dropped[reason] += 1
                continue
            if self.dedup:
                h = int(hashes[i])
                if h in self.seen:
                    self.dropped["duplicate"] += 1
                    continue
                self.seen.add(h)
            keep_ranges.append((offsets[i] - base, offsets[i + 1] - base))
            s.documents_kept += 1
            s.bytes_kept += int(clean_bytes[i])
        if len(keep_ranges) == len(reasons):
            kept = values
        else:
            kept = np.concatenate([values[a:b] for a, b in keep_ranges]) if keep_ranges else values[:0]
        s.tokens += int(len(kept))
        stream = np.concatenate([self.carry, kept.astype(np.int32, copy=False)])
        n_blocks = len(stream) // self.seq_len
        cut = n_blocks * self.seq_len
        blocks = stream[:cut].reshape(n_blocks, self.seq_len)
        self.carry = stream[cut:].copy()
        s.blocks += n_blocks
        self._report()
        return {"input_ids": blocks}

    def _report(self) -> None:
        s = self.stats
        s.dropped = dict(self.dropped)
        s.dropped_tail_tokens = int(len(self.carry))
        if self.split == "train":
            s.train_documents, s.train_blocks = s.documents_kept, s.blocks
        else:
            s.val_documents, s.val_blocks = s.documents_kept, s.blocks
        # Waited for, so the ledger is current by the time the consumer sees these blocks.
        ray.get(self.ledger.update.remote(self.split, self.started_ns, s.to_dict()))
