"""Typed configuration of the `data` and `tokenizer` sections (owned here, composed by cluster.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DemoCorpusConfig(BaseModel):
    """Size of the built-in synthetic support corpus, used when `data.paths` is empty."""

    model_config = ConfigDict(extra="forbid")

    num_documents: int = Field(2000, ge=10, le=10_000_000, description="documents to generate")
    num_sft_pairs: int = Field(1200, ge=10, le=10_000_000, description="prompt/response pairs to generate")
    seed: int = Field(0, description="generator seed; same seed, same corpus")


class DataConfig(BaseModel):
    """Where the corpus lives, how it is cleaned and how it is packed into blocks."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        default_factory=list,
        description="files, globs, directories or pyarrow URIs (s3://, gs://, file://); empty = demo corpus",
    )
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    txt_document: Literal["file", "paragraph"] = Field(
        "paragraph", description="a .txt file is one document, or one per blank-line-separated paragraph"
    )
    text_field: str = Field("text", description="field of a jsonl record / column of a parquet file")
    demo: DemoCorpusConfig = Field(default_factory=DemoCorpusConfig)
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFKC"
    min_chars: int = Field(1, ge=1, description="documents shorter than this (after cleaning) are dropped")
    max_chars: int = Field(1_000_000, ge=1, description="documents longer than this are dropped")
    dedup: bool = Field(True, description="exact de-duplication by content hash across the corpus")
    shuffle: bool = Field(
        True, description="seeded per-epoch shuffle of training blocks (train.seed); validation unshuffled"
    )
    seq_len: int = Field(256, ge=8, le=131_072, description="tokens per packed block")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out, by hash")
    mode: Literal["stream", "materialize"] = Field(
        "stream", description="stream blocks into training, or read Parquet token shards from shards_dir"
    )
    shards_dir: str | None = Field(None, description="Parquet token shards (default: <run>/data/shards)")
    tokenize_batch_size: int = Field(
        2048, ge=1, description="documents per batch through read → clean → tokenise → pack"
    )
    tokenize_tasks: int = Field(
        0, ge=0, le=1024, description="cap on concurrent read→tokenise tasks; 0 = the cluster's CPUs"
    )
    read_chunk_mb: float = Field(
        0, ge=0, description="MiB per read range (one task each); 0 = 1/64 of the corpus, within 1-64 MiB"
    )
    dedup_partitions: int = Field(
        0,
        ge=0,
        le=4096,
        description="actors sharing the dedup hash set (each holds 1/N); 0 = 1 per GiB of corpus or 32 CPUs",
    )

    @model_validator(mode="after")
    def _lengths_ordered(self) -> DataConfig:
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        return self


class TokenizerConfig(BaseModel):
    """Train a tokenizer on the cleaned corpus, or load an existing local one."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["bpe", "char"] = Field("bpe", description="byte-level BPE or character-level")
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    path: str | None = Field(None, description="load this tokenizer folder instead of training one")
    max_training_docs: int = Field(200_000, ge=1, description="documents sampled to train the tokenizer")
