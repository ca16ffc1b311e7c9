"""The data pipeline against a real S3-compatible server: corpus read from a bucket (byte ranges and
all), token shards and manifest written to one and read back by training's entry point."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs

from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.pipeline import prepare, token_datasets
from data_pipelines.readers import list_inputs, plan_reads


def _blocks(ds) -> np.ndarray:
    return np.concatenate([b["input_ids"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


def test_corpus_from_s3_shards_and_manifest_to_s3(ray_cluster, s3, shakespeare_parts, tmp_path):
    bucket = s3.bucket()
    corpus = s3.upload(shakespeare_parts, bucket, "corpus")
    shards = f"s3://{bucket}/tokens/shards"
    cfg = DataConfig(
        paths=[f"{corpus}/"],
        shards_dir=shards,
        mode="materialize",
        seq_len=32,
        val_fraction=0.1,
        read_chunk_mb=10_000 / (1 << 20),  # byte ranges inside the S3 objects, not just whole files
    )
    assert len(plan_reads(list_inputs(cfg.paths), cfg)) > len(list_inputs(cfg.paths))
    tok = TokenizerConfig(vocab_size=300)
    run = str(tmp_path / "run")
    manifest = prepare(cfg, tok, run)

    fs, root = pafs.FileSystem.from_uri(shards)
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        assert json.loads(f.read()) == manifest
    on_s3 = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File}
    written = {name for split in ("train", "val") for name in manifest["splits"][split]["files"]}
    assert written | {"manifest.json"} == on_s3
    assert manifest["splits"]["train"]["blocks"] > 10

    # Training's entry point reads the shards back from the bucket; the same corpus read from local
    # files gives the same blocks, so S3 changed nothing but where the bytes live.
    from_s3 = token_datasets(cfg, tok, run)
    assert from_s3.manifest == manifest
    local = token_datasets(
        cfg.model_copy(update={"paths": [str(shakespeare_parts)], "shards_dir": None, "mode": "stream"}),
        TokenizerConfig(path=manifest["tokenizer_dir"]),
        run,
    )
    for split in ("train", "val"):
        mine = _blocks(getattr(from_s3, split))
        assert len(mine) == manifest["splits"][split]["blocks"]
        assert np.array_equal(mine, _blocks(getattr(local, split)))
