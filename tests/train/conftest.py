"""Fixtures for the training tests: a char tokenizer and packed token blocks of tinyshakespeare.

The blocks are built here (not through the data pipeline) so the training tests exercise exactly
the contract the loop consumes: Ray Datasets of `{"input_ids": int32[seq_len]}`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from data_pipelines.config import TokenizerConfig
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

SEQ_LEN = 64
TINY_MODEL = {
    "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.intermediate_size": 128,
    "model.max_position_embeddings": SEQ_LEN,
}


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory, shakespeare) -> Path:
    out = tmp_path_factory.mktemp("tok")
    text = Path(shakespeare).read_text(encoding="utf-8")
    return train_tokenizer([text[i : i + 4000] for i in range(0, 40_000, 4000)],
                           TokenizerConfig(kind="char", vocab_size=128, min_frequency=1), out)


@pytest.fixture(scope="session")
def blocks(char_tokenizer, shakespeare) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) int32 blocks of SEQ_LEN tokens from the first ~100k characters."""
    tok = load_tokenizer(char_tokenizer)
    ids = np.array(tok(Path(shakespeare).read_text(encoding="utf-8")[:100_000])["input_ids"], dtype=np.int32)
    packed = ids[: len(ids) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN)
    return packed[:-64], packed[-64:]


def datasets(blocks, train_rows: int | None = None):
    import ray.data

    train, val = blocks
    train = train[:train_rows] if train_rows else train
    return (ray.data.from_items([{"input_ids": r} for r in train]),
            ray.data.from_items([{"input_ids": r} for r in val]))


def tiny_config(run_root: Path, name: str, **overrides):
    """A run config with the tiny model; `overrides` are dotted keys (train.max_steps=...)."""
    sets = {**TINY_MODEL, "data.seq_len": SEQ_LEN, "cluster.storage_path": str(run_root),
            "cluster.run_name": name, "train.num_workers": 2, "train.cpus_per_worker": 1,
            "train.micro_batch_size": 8, "train.warmup_steps": 2, "train.log_every": 1,
            "train.torch_threads": 1, **overrides}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])
