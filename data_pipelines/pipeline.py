"""The public data API: corpus → read plan → packed token blocks, on Ray Data.

    plan (once, on the driver: files → ranges of about one chunk, independent of the cluster)
      → one task per range, all in parallel: read → clean + hash → dedup (partitioned actors)
        → tokenise → pack → {"input_ids": int32[seq_len]}
      → stream into training, or Parquet shards + manifest (`prepare`)

`plan_corpus` resolves the corpus and plans its reads once; that `CorpusPlan` is what every later
step takes (tokenizer training, packing, shards, the manifest's corpus hash). No process sees every
token: packing happens inside the range tasks (`packing.py`), exact de-duplication is spread over
`data.dedup_partitions` actors (`dedup.py`), and each range reports its counts to the ledger once.

`token_datasets` is what training calls; `prepare` materialises the blocks as Parquet shards.
Block order is part of the contract (resume skips a counted number of blocks), so this module turns on
`DataContext.execution_options.preserve_order` for the driver; Ray Train copies that setting into
the datasets it splits across workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.data import DataContext

from data_pipelines.cleaning import clean_batch, training_documents
from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.dedup import DedupIndex
from data_pipelines.demo_corpus import write_demo_corpus
from data_pipelines.layout import RunLayout
from data_pipelines.packing import pack_ranges
from data_pipelines.readers import InputFile, list_inputs, object_store_env, plan_reads, read_ranges_udf
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
CPUS_PER_DEDUP_PARTITION = 32


class DataPipelineError(ValueError):
    """A data problem a user can fix (no documents left, unusable tokenizer folder)."""


@dataclass
class TokenData:
    """Packed token blocks for training, and where they came from.

    `train`/`val` rows are {"input_ids": int32 array of length seq_len}. In stream mode they are
    lazily executed: `stats()` sums the counts of every range executed so far (a range counts the
    same in every pass), so after one full pass over each split it describes exactly their blocks.
    """

    train: ray.data.Dataset
    val: ray.data.Dataset
    tokenizer_dir: str
    seq_len: int
    manifest: dict[str, Any] | None = None  # materialise mode: the manifest the shards came with
    ledger: Any = None  # stream mode: the actor the range tasks report their counts to (stats.RangeCounts)
    dedup: DedupIndex | None = None  # stream mode: the dedup partitions (their memory, for reports)

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
        demo = write_demo_corpus(data.demo, RunLayout(local_dir(run_dir, "the demo corpus")).demo_corpus)
        data = data.model_copy(update={"paths": [str(demo.corpus)], "format": "jsonl", "text_field": "text"})
    return data, list_inputs(data.paths, data.format)


def corpus_hash(data: DataConfig, files: list[InputFile]) -> str:
    """Identity of the packed corpus: cleaning and planning settings plus each file's name, size, mtime.

    Performance knobs, the mode, seq_len (checked on its own), the shard location and the training-side
    shuffle are left out, so changing them never invalidates a tokenizer or shards that are still correct.
    """
    knobs = {"mode", "shards_dir", "tokenize_batch_size", "tokenize_tasks", "dedup_partitions", "seq_len",
             "shuffle"}
    settings = data.model_dump(mode="json", exclude=knobs)
    files_id = [(f.uri, f.format, f.size, f.mtime_ns) for f in files]
    payload = json.dumps({"data": settings, "files": files_id}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CorpusPlan:
    """The resolved corpus and its read plan, made once and passed forward through every step.

    `ranges` are the rows of `readers.plan_reads`; they depend on the files and the config only, so
    the blocks (and a resumed run's position in them) are the same on any cluster.
    """

    data: DataConfig  # the effective config (the demo corpus filled in)
    files: list[InputFile]
    ranges: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, data: DataConfig, files: list[InputFile]) -> CorpusPlan:
        return cls(data, files, plan_reads(files, data))

    @property
    def hash(self) -> str:
        return corpus_hash(self.data, self.files)


def plan_corpus(data: DataConfig, run_dir: str) -> CorpusPlan:
    """Resolve the corpus (writing the demo corpus if none is configured) and plan its reads."""
    return CorpusPlan.of(*resolve_corpus(data, run_dir))


def _ordered() -> None:
    DataContext.get_current().execution_options.preserve_order = True


def _task_args(plan: CorpusPlan) -> dict[str, Any]:
    """Options of the range tasks.

    The default cap is the cluster's CPU count (or the number of ranges, if fewer): Ray frees a
    task's CPU while its output generator is paused by back-pressure, and without a cap Ray Data then
    starts more tasks than there are cores, which only adds processes fighting for the same caches
    (measured 10-15% slower on two cores). The cap only schedules; it never changes the blocks.
    Object-store credentials set in the driver's environment travel with the tasks (see
    `readers.object_store_env`), so a corpus on s3:// reads the same from every node.
    """
    cap = min(plan.data.tokenize_tasks or _cluster_cpus(), max(1, len(plan.ranges)))
    args: dict[str, Any] = {"batch_format": "pyarrow", "compute": ray.data.TaskPoolStrategy(size=cap)}
    if env := object_store_env():
        args["runtime_env"] = {"env_vars": env}
    return args


def _cluster_cpus() -> int:
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count()
    return max(1, int(cpus or 1))


def _ranges(plan: CorpusPlan) -> ray.data.Dataset:
    _ordered()
    return ray.data.from_items(plan.ranges, override_num_blocks=max(1, len(plan.ranges)))


def plan_documents(plan: CorpusPlan) -> ray.data.Dataset:
    """Lazy dataset of every input document: text (cleaned), reason ("" = kept), bytes, hash, val."""
    args = _task_args(plan)
    ds = _ranges(plan).map_batches(read_ranges_udf, batch_size=1, fn_kwargs={"cfg": plan.data}, **args)
    return ds.map_batches(clean_batch, batch_size=None, fn_kwargs={"cfg": plan.data}, **args)


def documents(data: DataConfig, files: list[InputFile]) -> ray.data.Dataset:
    """`plan_documents` for callers that hold the config and files only (evaluation's held-out text)."""
    return plan_documents(CorpusPlan.of(data, files))


def ensure_tokenizer(data: DataConfig, tok: TokenizerConfig, run_dir: str, files: list[InputFile]) -> str:
    """`ensure_plan_tokenizer` for callers that hold the config and files only."""
    return ensure_plan_tokenizer(CorpusPlan.of(data, files), tok, run_dir)


def ensure_plan_tokenizer(plan: CorpusPlan, tok: TokenizerConfig, run_dir: str) -> str:
    """`tok.path` if set; else `<run_dir>/tokenizer`, trained on the cleaned training split unless the
    folder already holds a tokenizer trained with the same settings on the same corpus."""
    if tok.path:
        if not (Path(tok.path) / "tokenizer.json").is_file():
            raise DataPipelineError(
                f"tokenizer.path: {tok.path} has no tokenizer.json (a transformers folder)"
            )
        return tok.path
    out = RunLayout(local_dir(run_dir, "training a tokenizer")).tokenizer
    stamp = out / TOKENIZER_STAMP
    want = {"tokenizer": tok.model_dump(mode="json", exclude={"path"}), "corpus": plan.hash}
    if stamp.is_file() and (out / "tokenizer.json").is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return str(out)
        except ValueError:
            pass
    docs = plan_documents(plan).map_batches(training_documents, batch_size=None, **_task_args(plan))
    docs = docs.limit(tok.max_training_docs)
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
    plan: CorpusPlan, split: str, tokenizer_dir: str, ledger: Any, dedup: DedupIndex | None
) -> ray.data.Dataset:
    """Lazy dataset of {"input_ids": int32[seq_len]} blocks of one split: one task per planned range."""
    tokenizer_json, eos_id = _tokenizer_payload(tokenizer_dir)
    kwargs = {
        "cfg": plan.data,
        "split": split,
        "tokenizer_json": tokenizer_json,
        "eos_id": eos_id,
        "dedup": dedup,
        "ledger": ledger,
    }
    return _ranges(plan).map_batches(pack_ranges, batch_size=1, fn_kwargs=kwargs, **_task_args(plan))


def _ledger_and_dedup(plan: CorpusPlan) -> tuple[Any, DedupIndex | None]:
    """The run's stats ledger and dedup partitions; with dedup, the first partition is the ledger."""
    dedup = _dedup(plan)
    return (dedup.ledger if dedup else new_ledger()), dedup


def _dedup(plan: CorpusPlan) -> DedupIndex | None:
    """The dedup partitions: `data.dedup_partitions`, else enough that each holds the documents of
    at most 1 GiB of corpus and serves at most `CPUS_PER_DEDUP_PARTITION` CPUs (one partition alone
    keeps up with over 100 cores' tokenisation, see benchmarks/tokenize_throughput.py), and no more:
    each is a process start, about a second of CPU. The count never changes the blocks."""
    if not plan.data.dedup:
        return None
    corpus_gib = -(-sum(f.size for f in plan.files) // (1 << 30))
    by_cpus = -(-_cluster_cpus() // CPUS_PER_DEDUP_PARTITION)
    return DedupIndex(plan.data.dedup_partitions or max(1, corpus_gib, by_cpus), len(plan.ranges))


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
    plan = plan_corpus(data, run_dir)
    tokenizer_dir = ensure_plan_tokenizer(plan, tok, run_dir)
    ledger, dedup = _ledger_and_dedup(plan)
    reset_dir(shards_dir)
    splits = {}
    for split in SPLITS:
        names, blocks = write_split(
            packed_blocks(plan, split, tokenizer_dir, ledger, dedup),
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
        "data_hash": plan.hash,
        "read_ranges": len(plan.ranges),
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
    plan = plan_corpus(data, run_dir)
    tokenizer_dir = ensure_plan_tokenizer(plan, tok, run_dir)
    manifest = read_manifest(shards_dir_of(data, run_dir))
    current = _current(manifest, data.seq_len, tokenizer_hash(tokenizer_dir), plan.hash)
    return manifest if current else None


def token_datasets(data: DataConfig, tok: TokenizerConfig, run_dir: str) -> TokenData:
    """Packed blocks for training: lazily streamed, or read from current Parquet shards (see module doc)."""
    _ordered()
    if data.mode == "materialize":
        manifest = current_manifest(data, tok, run_dir) or prepare(data, tok, run_dir)
        shards_dir = shards_dir_of(data, run_dir)
        train, val = (read_split(shards_dir, manifest, split) for split in SPLITS)
        return TokenData(train, val, manifest["tokenizer_dir"], data.seq_len, manifest=manifest)
    plan = plan_corpus(data, run_dir)
    tokenizer_dir = ensure_plan_tokenizer(plan, tok, run_dir)
    ledger, dedup = _ledger_and_dedup(plan)
    train, val = (packed_blocks(plan, split, tokenizer_dir, ledger, dedup) for split in SPLITS)
    return TokenData(train, val, str(tokenizer_dir), data.seq_len, ledger=ledger, dedup=dedup)
