"""Read → clean → de-duplicate → tokenise → pack, one Ray Data task per planned range, all in parallel.

No process sees every token. Each task owns one range of the read plan (`readers.plan_reads`) and
turns it into blocks of exactly seq_len tokens:

1. read and clean the range's documents (about one chunk of text, held while the range is worked);
2. ask the dedup partitions which kept documents are their content's first occurrence in the corpus
   (`dedup.py`: exact, decided by corpus position, the same on every run);
3. tokenise the kept documents of this task's split, in batches, each followed by eos;
4. pack the range's token stream with a carry buffer, so blocks are exact whatever the batching;
   the range's last partial block (< seq_len tokens) is dropped and counted as tail tokens;
5. report the range's counts to the ledger in one call, before its last blocks leave the task.

Dropping each range's tail costs at most seq_len - 1 tokens per range (ranges are 1–64 MiB, so
about 0.1% at seq_len 1024); it buys packing that needs no ordered serial stage. The blocks depend
only on the corpus, the config and the tokenizer: the plan never depends on the cluster, and Ray Data's
`preserve_order` yields the ranges' blocks in plan order.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tokenizers import Tokenizer

from data_pipelines.cleaning import clean_batch
from data_pipelines.config import DataConfig
from data_pipelines.dedup import DedupIndex
from data_pipelines.readers import RAW_SCHEMA, read_range
from data_pipelines.stats import CorpusStats

_TOKENIZERS: dict[str, Tokenizer] = {}
_PARALLELISM = "TOKENIZERS_PARALLELISM"
_OUT_TOKENS = 1 << 20  # tokens per output block (4 MiB of int32), at least one batch's rows


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


def _encode(tok: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """The documents' token ids, each followed by eos, as one int32 array (one list, one
    conversion: a numpy array per document costs more than the ids themselves)."""
    with _serial_tokenizers():
        encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids += enc.ids
        ids.append(eos_id)
    return np.array(ids, dtype=np.int32)


def clean_range(item: dict[str, Any], cfg: DataConfig) -> pa.Table:
    """Every document of one planned range, cleaned (columns of `cleaning.clean_batch`), in order."""
    raw = list(read_range(item, cfg)) or [RAW_SCHEMA.empty_table()]
    return pa.concat_tables([clean_batch(t, cfg) for t in raw])


def split_rows(docs: pa.Table, cleaned_out: np.ndarray, split: str) -> np.ndarray:
    """Row indices of `split`: the train split also counts every document cleaning dropped, so each
    dropped document is counted once; a duplicate belongs to the split its content hashes to."""
    val = docs.column("val").to_numpy(zero_copy_only=False)
    mask = cleaned_out | ~val if split == "train" else ~cleaned_out & val
    return np.flatnonzero(mask)


def pack_range(
    item: dict[str, Any],
    cfg: DataConfig,
    split: str,
    tokenizer_json: str,
    eos_id: int,
    dedup: DedupIndex | None,
    ledger: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Blocks {"input_ids": int32[n, seq_len]} of one range's `split` (steps 1–5 of the module doc)."""
    docs = clean_range(item, cfg)
    reasons = docs.column("reason").to_numpy(zero_copy_only=False)  # object array of str
    cleaned_out = pc.not_equal(docs.column("reason"), "").to_numpy(zero_copy_only=False)
    dropped = cleaned_out
    if dedup is not None:
        kept = np.flatnonzero(~cleaned_out)
        hashes = docs.column("hash").to_numpy()[kept]
        duplicate = kept[~dedup.first_occurrences(item["index"], hashes, kept)]
        reasons[duplicate] = "duplicate"
        dropped = cleaned_out.copy()
        dropped[duplicate] = True
    rows = split_rows(docs, cleaned_out, split)
    stats = _counts(docs, reasons, dropped, rows)
    keep = rows[~dropped[rows]]
    texts = docs.column("text").take(keep).to_pylist()  # only the documents to tokenise
    tok = _tokenizer(tokenizer_json)
    carry = np.zeros(0, dtype=np.int32)
    out: list[np.ndarray] = []  # packed rows not sent yet; the last are sent after the ledger call
    out_tokens = 0
    for lo in range(0, len(texts), cfg.tokenize_batch_size):
        ids = _encode(tok, texts[lo : lo + cfg.tokenize_batch_size], eos_id)
        stats.tokens += len(ids)
        stream = np.concatenate([carry, ids])
        n = len(stream) // cfg.seq_len
        carry = stream[n * cfg.seq_len :]
        if n:
            stats.blocks += n
            if out_tokens >= _OUT_TOKENS:
                yield _output(out)
                out, out_tokens = [], 0
            out.append(stream[: n * cfg.seq_len].reshape(n, cfg.seq_len))
            out_tokens += n * cfg.seq_len
    stats.dropped_tail_tokens = len(carry)
    if split == "train":
        stats.train_documents, stats.train_blocks = stats.documents_kept, stats.blocks
    else:
        stats.val_documents, stats.val_blocks = stats.documents_kept, stats.blocks
    ray.get(ledger.add.remote(split, item["index"], stats.to_dict(), dedup.run if dedup else 0))
    if out:
        yield _output(out)


def _output(rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One output block of packed rows. Each yield is an object-store put and a block for Ray Data
    to track, so a task sends a few MiB at a time rather than one tokenise batch."""
    return {"input_ids": rows[0] if len(rows) == 1 else np.concatenate(rows)}


def _counts(docs: pa.Table, reasons: np.ndarray, dropped: np.ndarray, rows: np.ndarray) -> CorpusStats:
    nbytes = docs.column("bytes").to_numpy()[rows]
    clean_bytes = docs.column("clean_bytes").to_numpy()[rows]
    kept = ~dropped[rows]
    return CorpusStats(
        documents_read=len(rows),
        documents_kept=int(kept.sum()),
        dropped=dict(Counter(reasons[rows[~kept]].tolist())),
        bytes_read=int(nbytes.sum()),
        bytes_kept=int(clean_bytes[kept].sum()),
    )


def pack_ranges(batch: pa.Table, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches UDF over rows of the read plan (see `pack_range`)."""
    for item in batch.to_pylist():
        yield from pack_range(item, **kwargs)
