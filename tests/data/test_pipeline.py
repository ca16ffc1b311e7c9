"""The corpus → token pipeline on a real Ray cluster: counts, exact packing, dedup, split, both modes.

The reference (`expected_blocks`) is computed without Ray, document by document, straight from the
contract: clean, drop a content seen earlier in corpus order, tokenise with eos, pack each planned
range on its own and drop its tail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from data_pipelines.cleaning import clean_text, doc_hash, is_val
from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.pipeline import current_manifest, prepare, token_datasets
from data_pipelines.readers import list_inputs, plan_reads, read_range
from data_pipelines.tokenizer import EOS, load_tokenizer, tokenizer_hash
from tests.data.conftest import expected_reasons


def _blocks(ds) -> np.ndarray:
    rows = [np.asarray(b["input_ids"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.int32)


def _joined_ids(tokenizer_dir: str, docs: list[str]) -> list[int]:
    """The token stream packing must reproduce: each document's ids followed by eos."""
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    return [i for d in docs for i in [*tok.encode(d, add_special_tokens=False).ids, eos]]


def expected_blocks(cfg: DataConfig, tokenizer_dir: str, split: str) -> tuple[np.ndarray, int, int]:
    """(blocks, dropped tail tokens, kept documents) of one split, computed without Ray."""
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    seen: set[int] = set()
    blocks, tail, kept = [], 0, 0
    for item in plan_reads(list_inputs(cfg.paths, cfg.format), cfg):
        stream: list[int] = []
        for table in read_range(item, cfg):
            for text, reason in zip(
                table.column("text").to_pylist(), table.column("reason").to_pylist(), strict=True
            ):
                if reason:
                    continue
                text, reason = clean_text(text, cfg)
                if reason or (cfg.dedup and doc_hash(text) in seen):
                    continue
                seen.add(doc_hash(text))
                if is_val(doc_hash(text), cfg.val_fraction) == (split == "val"):
                    kept += 1
                    stream += [*tok.encode(text, add_special_tokens=False).ids, eos]
        n = len(stream) // cfg.seq_len
        blocks += stream[: n * cfg.seq_len]
        tail += len(stream) - n * cfg.seq_len
    return np.array(blocks, dtype=np.int32).reshape(-1, cfg.seq_len), tail, kept


def test_broken_corpus_is_counted_per_reason_and_never_crashes(
    ray_cluster, broken_corpus, small_cfg, char_tok, tmp_path
):
    cfg = small_cfg.model_copy(update={"paths": [str(broken_corpus)]})
    td = token_datasets(cfg, char_tok, str(tmp_path / "run"))
    blocks = _blocks(td.train)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 16
    assert len(_blocks(td.val)) == 0
    stats = td.stats()
    assert stats.dropped == expected_reasons()
    kept = [
        "Alpha doc one.",
        "Beta doc two.",
        "Gamma fine café.",
        "Delta from jsonl.",
        "Epsilon, the last one.",
    ]
    assert stats.documents_kept == len(kept)
    assert stats.documents_read == len(kept) + sum(expected_reasons().values())
    assert stats.bytes_kept == sum(len(d.encode()) for d in kept)
    assert stats.blocks == len(blocks) and stats.tokens == stats.blocks * 16 + stats.dropped_tail_tokens
    expected = _joined_ids(td.tokenizer_dir, kept)
    assert blocks.reshape(-1).tolist() == expected[: len(blocks) * 16]
    assert stats.dropped_tail_tokens == len(expected) - len(blocks) * 16
    assert load_tokenizer(td.tokenizer_dir).decode(expected) == "".join(d + EOS for d in kept)


def test_packing_is_exact_per_range_dedup_is_by_corpus_order_and_split_is_by_hash(
    ray_cluster, shakespeare_parts, tmp_path
):
    """Several ranges (small read chunks, byte ranges inside files), several dedup partitions and
    duplicates within a range and across ranges: blocks equal the reference, block for block."""
    part0 = (shakespeare_parts / "part0.txt").read_text(encoding="utf-8").split("\n\n")
    # A later file repeating earlier paragraphs, and itself twice: 40 duplicates of kept documents.
    (shakespeare_parts / "part9.txt").write_text("\n\n".join(part0[:20] * 2), encoding="utf-8")
    cfg = DataConfig(
        paths=[str(shakespeare_parts)],
        seq_len=64,
        val_fraction=0.25,
        tokenize_batch_size=5,
        tokenize_tasks=3,
        dedup_partitions=3,
        read_chunk_mb=10_000 / (1 << 20),
    )
    assert len(plan_reads(list_inputs(cfg.paths), cfg)) >= 8
    td = token_datasets(cfg, TokenizerConfig(vocab_size=300), str(tmp_path / "run"))
    tails = 0
    for split, ds in (("train", td.train), ("val", td.val)):
        expected, tail, kept = expected_blocks(cfg, td.tokenizer_dir, split)
        assert kept > 10
        blocks = _blocks(ds)
        assert np.array_equal(blocks, expected)
        stats = td.stats()
        assert getattr(stats, f"{split}_documents") == kept
        assert getattr(stats, f"{split}_blocks") == len(blocks)
        tails += tail
    assert stats.dropped_tail_tokens == tails > 0
    assert stats.tokens - stats.blocks * 64 == stats.dropped_tail_tokens
    assert stats.dropped.get("duplicate", 0) >= 40


def test_blocks_do_not_depend_on_task_count_batching_or_partitions(ray_cluster, shakespeare_parts, tmp_path):
    """What the cluster looks like (tasks, batch size, dedup partitions) never changes the blocks, so
    a resumed run on a cluster of another size continues exactly; repeated executions agree too."""
    base = DataConfig(paths=[str(shakespeare_parts)], seq_len=32, read_chunk_mb=10_000 / (1 << 20))
    tok = TokenizerConfig(vocab_size=300)
    runs = []
    for tasks, batch, parts in ((1, 2048, 1), (4, 3, 5)):
        cfg = base.model_copy(
            update={"tokenize_tasks": tasks, "tokenize_batch_size": batch, "dedup_partitions": parts}
        )
        td = token_datasets(cfg, tok, str(tmp_path / "run"))
        runs.append((_blocks(td.train), _blocks(td.val), td.stats()))
        runs.append((_blocks(td.train), _blocks(td.val), td.stats()))  # the same lazy dataset again
    for train, val, stats in runs[1:]:
        assert np.array_equal(train, runs[0][0]) and np.array_equal(val, runs[0][1])
        assert stats == runs[0][2]


def test_parquet_column_through_file_uri(ray_cluster, tmp_path, char_tok):
    pq.write_table(
        pa.table({"body": ["from parquet one", None, "from parquet two"], "n": [1, 2, 3]}),
        tmp_path / "a.parquet",
    )
    cfg = DataConfig(paths=[f"file://{tmp_path}/*.parquet"], text_field="body", seq_len=8, val_fraction=0.0)
    td = token_datasets(cfg, char_tok, str(tmp_path / "run"))
    blocks = _blocks(td.train)
    stats = td.stats()
    assert (stats.documents_read, stats.documents_kept, stats.dropped) == (3, 2, {"missing_field": 1})
    expected = _joined_ids(td.tokenizer_dir, ["from parquet one", "from parquet two"])
    assert blocks.reshape(-1).tolist() == expected[: len(blocks) * 8] and len(blocks) == len(expected) // 8


def test_materialize_writes_shards_reuses_them_and_matches_stream(ray_cluster, shakespeare_parts, tmp_path):
    run = str(tmp_path / "run")
    cfg = DataConfig(
        paths=[str(shakespeare_parts)], seq_len=32, val_fraction=0.1, mode="materialize", tokenize_tasks=2
    )
    tok = TokenizerConfig(vocab_size=300)
    manifest = prepare(cfg, tok, run)
    shards = Path(run) / "data" / "shards"
    on_disk = json.loads((shards / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["seq_len"] == 32
    assert manifest["tokenizer_hash"] == tokenizer_hash(Path(run) / "tokenizer")
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == info["blocks"] * 32 and all((shards / f).is_file() for f in info["files"])
    assert (
        manifest["stats"]["blocks"]
        == manifest["splits"]["train"]["blocks"] + manifest["splits"]["val"]["blocks"]
    )
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}

    td = token_datasets(cfg, tok, run)  # current shards: reused, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == mtimes
    assert td.manifest == manifest and td.stats().blocks == manifest["stats"]["blocks"]
    stream = token_datasets(cfg.model_copy(update={"mode": "stream"}), tok, run)
    for a, b in ((td.train, stream.train), (td.val, stream.val)):
        mat, streamed = _blocks(a), _blocks(b)
        assert mat.dtype == streamed.dtype == np.int32
        assert np.array_equal(mat, streamed)

    # A different seq_len makes the shards stale (token_datasets would re-prepare them).
    assert current_manifest(cfg, tok, run) == manifest
    assert current_manifest(cfg.model_copy(update={"seq_len": 16}), tok, run) is None
