"""Small corpora with known content (and known breakage) for the data pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines.config import DataConfig, TokenizerConfig

LONG_LINE = "word " * 2000  # 10,000 chars: over the max_chars used below

# Paragraphs of good.txt; reasons are what the pipeline must report for each.
TXT_PARAGRAPHS = [
    (b"Alpha doc one.", ""),
    (b"Beta   doc\ttwo.", ""),  # whitespace collapses to "Beta doc two."
    (b"Alpha doc one.", "duplicate"),
    (b" \x00\x01 \x7f ", "empty"),  # only control characters and spaces
    (LONG_LINE.encode(), "too_long"),
    (b"bad \xff\xfe bytes", "invalid_utf8"),
    (b"x", "too_short"),
    (b"Gamma \xef\xac\x81ne caf\xc3\xa9.", ""),  # NFKC turns the fi ligature into "fi"
]

JSONL_LINES = [
    (json.dumps({"text": "Delta from jsonl."}).encode(), ""),
    (b"{not json", "invalid_json"),
    (json.dumps({"other": "no text field"}).encode(), "missing_field"),
    (json.dumps({"text": 5}).encode(), "non_string_field"),
    (json.dumps({"text": None}).encode(), "missing_field"),
    (json.dumps({"text": ""}).encode(), "empty"),
    (b'{"text": "broken \xff utf8"}', "invalid_utf8"),
    (json.dumps(["a", "list"]).encode(), "missing_field"),
    (b"", "skip"),  # a blank line is not a document
    (json.dumps({"text": "Beta doc two."}).encode(), "duplicate"),  # duplicate across files
    (json.dumps({"text": "Epsilon, the last one."}).encode(), ""),
]


@pytest.fixture
def broken_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a_good.txt").write_bytes(b"\n\n  \n".join(p for p, _ in TXT_PARAGRAPHS) + b"\n")
    (root / "b_data.jsonl").write_bytes(b"\n".join(line for line, _ in JSONL_LINES) + b"\n")
    (root / ".hidden.txt").write_text("never read")
    return root


def expected_reasons() -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reason in TXT_PARAGRAPHS + JSONL_LINES:
        if reason and reason != "skip":
            counts[reason] = counts.get(reason, 0) + 1
    return counts


@pytest.fixture
def small_cfg() -> DataConfig:
    return DataConfig(min_chars=2, max_chars=5000, seq_len=16, val_fraction=0.0, tokenize_batch_size=3)


@pytest.fixture
def char_tok() -> TokenizerConfig:
    return TokenizerConfig(kind="char", vocab_size=256, min_frequency=1)
