"""Parquet token shards and their manifest: the materialised form of the packed blocks.

Shards are written by the driver from the ordered block stream, with names that sort in stream
order (`train-00000.parquet`, ...), so reading them back in manifest order yields exactly the blocks
stream mode yields. The manifest is written last and removed first: a folder without a manifest is
never trusted, so an interrupted run is simply prepared again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.extensions import ArrowTensorArray

from data_pipelines.readers import object_store_env, open_uri

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "raylm-token-shards/1"
SHARD_BYTES = 32 << 20


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def read_manifest(shards_dir: str) -> dict[str, Any] | None:
    fs, root = open_uri(shards_dir)
    path = _join(root, MANIFEST)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def write_manifest(shards_dir: str, manifest: dict[str, Any]) -> None:
    fs, root = open_uri(shards_dir)
    with fs.open_output_stream(_join(root, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))


def reset_dir(shards_dir: str) -> None:
    """Remove the manifest first, then the shards this module wrote; leave anything else alone."""
    fs, root = open_uri(shards_dir)
    fs.create_dir(root, recursive=True)
    manifest = _join(root, MANIFEST)
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = info.base_name
        if (
            info.type == pafs.FileType.File
            and name.endswith(".parquet")
            and name.startswith(("train-", "val-"))
        ):
            fs.delete_file(info.path)


def _table(blocks: np.ndarray) -> pa.Table:
    return pa.table({"input_ids": ArrowTensorArray.from_numpy(blocks)})


def write_split(
    ds: ray.data.Dataset,
    shards_dir: str,
    split: str,
    seq_len: int,
    on_blocks: Callable[[str, int], None] | None = None,
) -> tuple[list[str], int]:
    """Stream `ds` (rows {"input_ids"}) into ordered shards; returns (file names, blocks written)."""
    fs, root = open_uri(shards_dir)
    rows_per_shard = max(1, SHARD_BYTES // (4 * seq_len))
    names: list[str] = []
    pending: list[np.ndarray] = []
    n_pending = 0
    total = 0

    def flush() -> None:
        nonlocal pending, n_pending
        name = f"{split}-{len(names):05d}.parquet"
        blocks = np.concatenate(pending) if pending else np.zeros((0, seq_len), dtype=np.int32)
        pq.write_table(_table(blocks), _join(root, name), filesystem=fs)
        names.append(name)
        pending, n_pending = [], 0

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids = np.asarray(batch["input_ids"], dtype=np.int32).reshape(-1, seq_len)
        if not len(ids):
            continue
        pending.append(ids)
        n_pending += len(ids)
        total += len(ids)
        if n_pending >= rows_per_shard:
            flush()
        if on_blocks is not None:
            on_blocks(split, total)
    if pending or not names:
        flush()  # an empty split still gets one (empty) shard, so readers need no special case
    return names, total


def read_split(shards_dir: str, manifest: dict[str, Any], split: str) -> ray.data.Dataset:
    fs, root = open_uri(shards_dir)
    paths = [_join(root, name) for name in manifest["splits"][split]["files"]]
    env = object_store_env()  # the read tasks open the shards on other nodes (see readers)
    remote_args = {"runtime_env": {"env_vars": env}} if env else {}
    return ray.data.read_parquet(paths, filesystem=fs, ray_remote_args=remote_args)
