"""The public data API: corpus → cleaned documents → tokenizer → packed token blocks, on Ray Data.

    read (parallel, per file or byte range) → clean + hash + split → tokenize
      → de-duplicate + pack (one ordered actor) → {"input_ids": int32[seq_len]}

Reading, cleaning and tokenising are one fused Ray Data task per byte range (no object-store hop
between them, one task per CPU); only the packer is a separate, serial stage.

`token_datasets` is what training calls; `prepare` materialises the blocks as Parquet shards.
Block order is part of the contract (packing is exact only in order), so this module turns on
`DataContext.execution_options.preserve_order` for the driver; Ray Train copies that setting into
the datasets it splits across workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.data import DataContext

from data_pipelines.cleaning import clean_batch, select_split
from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.demo_corpus import write_demo_corpus
from data_pipelines.packing import Packer, tokenize_batch
from data_pipelines.readers import InputFile, list_inputs, plan_reads, read_ranges_udf
from data_pipelines.shards import (
    MANIFEST_FORMAT,
    read_manifest,
    read_split,
    reset_dir,
    write_manifest,
    write_split,
)
from data_pipelines.stats import CorpusStats, combine, new_ledger
from data_pipelines.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer

TOKENIZER_STAMP = "raylm_tokenizer.json"
SPLITS = ("train", "val")


class DataPipelineError(ValueError):
    """A data problem a user can fix (no documents left, unusable tokenizer folder)."""


@dataclass
class TokenData:
    """Packed token blocks for training, and where they came from.

    `train`/`val` rows are {"input_ids": int32 array of length seq_len}. In stream mode they are
    lazily executed: `stats()` reports the counts of the latest complete pass over each split.
    """

    train: ray.data.Dataset
    val: ray.data.Dataset
    tokenizer_dir: str
    seq_len: int
    manifest: dict[str, Any] | None = None  # materialise mode: the manifest the shards came with
    ledger: Any = None  # stream mode: the StatsLedger actor the packers report to

    def stats(self) -> CorpusStats | None:
        if self.manifest is not None:
            return CorpusStats.from_dict(self.manifest["stats"])
        if self.ledger is not None:
            per_split = ray.get(self.ledger.stats.remote())
            return combine(per_split) if per_split else None
        return None


def local_dir(run_dir: str, what: str) -> Path:
    """The tokenizer folder and the demo corpus are local files (transformers loads them from disk)."""
    if run_dir.startswith("file://"):
        return Path(run_dir.removeprefix("file://"))
    if "://" in run_dir:
        raise DataPipelineError(
            f"{what} needs a local run folder, but the run folder is {run_dir}; use a local "
            "cluster.storage_path (data.shards_dir may still be a URI) or set tokenizer.path and data.paths"
        )
    return Path(run_dir)


def resolve_corpus(data: DataConfig, run_dir: str) -> tuple[DataConfig, list[InputFile]]:
    """The effective data config and its input files; `paths == []` means the built-in demo corpus."""
    if not data.paths:
        demo = write_demo_corpus(data.demo, local_dir(run_dir, "the demo corpus") / "data" / "demo")
        data = data.model_copy(update={"paths": [str(demo.corpus)], "format": "jsonl", "text_field": "text"})
    return data, list_inputs(data.paths, data.format)


def corpus_hash(data: DataConfig, files: list[InputFile]) -> str:
    """Identity of the cleaned corpus: cleaning settings plus each input file's name, size and mtime.

    Performance knobs, the mode, seq_len (checked on its own), the shard location and the training-side
    shuffle are left out, so changing them never invalidates a tokenizer or shards that are still correct.
    """
    settings = data.model_dump(
        mode="json",
        exclude={"mode", "shards_dir", "tokenize_batch_size", "tokenize_tasks", "read_chunk_mb", "seq_len",
                 "shuffle"},
    )
    files_id = [(f.uri, f.format, f.size, f.mtime_ns) for f in files]
    payload = json.dumps({"data": settings, "files": files_id}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _ordered() -> None:
    DataContext.get_current().execution_options.preserve_order = True


def _task_args(data: DataConfig, files: list[InputFile]) -> dict[str, Any]:
    """The same arguments on every task stage, so Ray Data fuses them into one task per byte range.

    The default cap is the cluster's CPU count (or the number of read ranges, if fewer): Ray frees a
    task's CPU while its output generator is paused by back-pressure, and without a cap Ray Data then
    starts more tasks than there are cores, which only adds processes fighting for the same caches
    (measured 10-15% slower on two cores).
    """
    cpus = _cluster_cpus()
    cap = data.tokenize_tasks or min(cpus, len(plan_reads(files, data, cpus)))
    return {"batch_format": "pyarrow", "concurrency": cap}


def _cluster_cpus() -> int:
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count()
    return max(1, int(cpus or 1))


def documents(data: DataConfig, files: list[InputFile]) -> ray.data.Dataset:
    """Lazy dataset of every input document: text (cleaned), reason ("" = kept), bytes, hash, val."""
    _ordered()
    items = plan_reads(files, data, _cluster_cpus())
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_ranges_udf, batch_size=1, fn_kwargs={"cfg": data}, **_task_args(data, files))
    return ds.map_batches(clean_batch, batch_size=None, fn_kwargs={"cfg": data}, **_task_args(data, files))


def _split(docs: ray.data.Dataset, which: str, data: DataConfig, files: list[InputFile]) -> ray.data.Dataset:
    args = _task_args(data, files)
    return docs.map_batches(select_split, batch_size=None, fn_kwargs={"which": which}, **args)


def ensure_tokenizer(data: DataConfig, tok: TokenizerConfig, run_dir: str, files: list[InputFile]) -> str:
    """`tok.path` if set; else `<run_dir>/tokenizer`, trained on the cleaned training split unless the
    folder already holds a tokenizer trained with the same settings on the same corpus."""
    if tok.path:
        if not (Path(tok.path) / "tokenizer.json").is_file():
            raise DataPipelineError(
                f"tokenizer.path: {tok.path} has no tokenizer.json (a transformers folder)"
            )
        return tok.path
    out = local_dir(run_dir, "training a tokenizer") / "tokenizer"
    stamp = out / TOKENIZER_STAMP
    want = {"tokenizer": tok.model_dump(mode="json", exclude={"path"}), "corpus": corpus_hash(data, files)}
    if stamp.is_file() and (out / "tokenizer.json").is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return str(out)
        except ValueError:
            pass
    docs = _split(documents(data, files), "tokenizer", data, files).limit(tok.max_training_docs)
    n_docs = 0

    def texts():
        nonlocal n_docs
        for batch in docs.iter_batches(batch_size=1024, batch_format="pyarrow"):
            column = batch.column("text").to_pylist()
            n_docs += len(column)
            yield from column

    train_tokenizer(texts(), tok, out)
    if n_docs == 0:
        raise DataPipelineError("no training documents left after cleaning; check data.paths and the filters")
    stamp.write_text(json.dumps(want, indent=2, sort_keys=True))
    return str(out)


def _tokenizer_payload(tokenizer_dir: str) -> tuple[str, int]:
    fast = load_tokenizer(tokenizer_dir)
    if fast.eos_token_id is None:
        raise DataPipelineError(f"tokenizer at {tokenizer_dir} defines no eos token")
    return fast.backend_tokenizer.to_str(), int(fast.eos_token_id)


def packed_blocks(
    docs: ray.data.Dataset,
    split: str,
    data: DataConfig,
    tokenizer_dir: str,
    ledger: Any,
    files: list[InputFile],
) -> ray.data.Dataset:
    """Lazy dataset of {"input_ids": int32[seq_len]} blocks for one split of `documents(data, files)`."""
    tokenizer_json, eos_id = _tokenizer_payload(tokenizer_dir)
    ds = _split(docs, split, data, files)
    ds = ds.map_batches(
        tokenize_batch,
        batch_size=None,
        fn_kwargs={"tokenizer_json": tokenizer_json, "eos_id": eos_id},
        **_task_args(data, files),
    )
    return ds.map_batches(
        Packer,
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
        # Ray Data lets its actors run queued calls out of order by default (preserve_order only
        # reorders outputs); the packer's carry buffer and seen-set need its calls in corpus order.
        allow_out_of_order_execution=False,
        # A restarted packer would have lost its carry and seen-set and emit wrong blocks without a
        # word: fail the execution instead (training then resumes from its last checkpoint).
        max_restarts=0,
        fn_constructor_kwargs={
            "seq_len": data.seq_len,
            "split": split,
            "dedup": data.dedup,
            "ledger": ledger,
        },
    )


def shards_dir_of(data: DataConfig, run_dir: str) -> str:
    return data.shards_dir or f"{run_dir.rstrip('/')}/data/shards"


def _current(manifest: dict[str, Any] | None, seq_len: int, tok_hash: str, data_hash: str) -> bool:
    return (
        manifest is not None
        and manifest.get("seq_len") == seq_len
        and manifest.get("tokenizer_hash") == tok_hash
        and manifest.get("data_hash") == data_hash
    )


def prepare(
    data: DataConfig,
    tok: TokenizerConfig,
    run_dir: str,
    on_blocks: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Materialise: write Parquet token shards + manifest.json into the shards dir; return the manifest.

    `on_blocks(split, blocks_written)` is called as blocks arrive (for progress displays).
    """
    shards_dir = shards_dir_of(data, run_dir)
    data, files = resolve_corpus(data, run_dir)
    tokenizer_dir = ensure_tokenizer(data, tok, run_dir, files)
    ledger = new_ledger()
    reset_dir(shards_dir)
    docs = documents(data, files)
    splits = {}
    for split in SPLITS:
        names, blocks = write_split(
            packed_blocks(docs, split, data, tokenizer_dir, ledger, files),
            shards_dir,
            split,
            data.seq_len,
            on_blocks,
        )
        splits[split] = {"files": names, "blocks": blocks, "tokens": blocks * data.seq_len}
    stats = combine(ray.get(ledger.stats.remote()))
    manifest = {
        "format": MANIFEST_FORMAT,
        "seq_len": data.seq_len,
        "tokenizer_hash": tokenizer_hash(tokenizer_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "data_hash": corpus_hash(data, files),
        "splits": splits,
        "stats": stats.to_dict(),
        "created_unix_s": int(time.time()),
    }
    write_manifest(shards_dir, manifest)
    return manifest


def current_manifest(data: DataConfig, tok: TokenizerConfig, run_dir: str) -> dict[str, Any] | None:
    """The manifest of the shards dir if its shards match this corpus, tokenizer and seq_len, else None.

    Trains the tokenizer first when the run has no current one (its hash is part of the check).
    """
    effective, files = resolve_corpus(data, run_dir)
    tokenizer_dir = ensure_tokenizer(effective, tok, run_dir, files)
    manifest = read_manifest(shards_dir_of(data, run_dir))
    current = _current(manifest, data.seq_len, tokenizer_hash(tokenizer_dir), corpus_hash(effective, files))
    return manifest if current else None


def token_datasets(data: DataConfig, tok: TokenizerConfig, run_dir: str) -> TokenData:
    """Packed blocks for training: lazily streamed, or read from current Parquet shards (see module doc)."""
    _ordered()
    if data.mode == "materialize":
        manifest = current_manifest(data, tok, run_dir) or prepare(data, tok, run_dir)
        shards_dir = shards_dir_of(data, run_dir)
        train, val = (read_split(shards_dir, manifest, split) for split in SPLITS)
        return TokenData(train, val, manifest["tokenizer_dir"], data.seq_len, manifest=manifest)
    effective, files = resolve_corpus(data, run_dir)
    tokenizer_dir = ensure_tokenizer(effective, tok, run_dir, files)
    ledger = new_ledger()
    docs = documents(effective, files)
    train, val = (packed_blocks(docs, split, effective, tokenizer_dir, ledger, files) for split in SPLITS)
    return TokenData(train, val, str(tokenizer_dir), data.seq_len, ledger=ledger)
