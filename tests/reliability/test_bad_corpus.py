"""Bad corpus input: binary and invalid UTF-8 files, a 100 MB single line, empty files, a directory and a
dangling symlink where files are expected. The pipeline counts each per reason and keeps going; the
long line is skipped while streaming (bounded memory); the corpus files are left untouched."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.pipeline import token_datasets
from data_pipelines.readers import CorpusNotFoundError, list_inputs, read_file_docs

HUGE_BYTES = 100 * (1 << 20)
KEPT = ["Alpha document one.", "Beta document two.", "A good jsonl line."]


def _write_huge_line(path: Path) -> None:
    chunk = b"y" * (1 << 20)
    with path.open("wb") as f:
        for _ in range(HUGE_BYTES // len(chunk)):
            f.write(chunk)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-corpus")
    (d / "good.txt").write_text(f"{KEPT[0]}\n\n{KEPT[1]}\n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)  # NULs, control bytes, 0xff: not UTF-8
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (d / "mixed.jsonl").write_bytes(
        b'{"text": "' + KEPT[2].encode() + b'"}\n{"text": "\xff\xfe"}\n\x00\x01\x02\n'
    )
    (d / "empty.txt").write_bytes(b"")
    (d / "empty.jsonl").write_bytes(b"\n\n")
    (d / "dir.txt").mkdir()  # a directory where a file is expected
    (d / "dangling.txt").symlink_to(d / "deleted.txt")  # unreadable: its target is gone
    _write_huge_line(d / "huge.txt")
    return d


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def test_bad_corpus_is_counted_per_reason_and_the_run_goes_on(ray_cluster, bad_corpus, tmp_path):
    before = _snapshot(bad_corpus)
    data = DataConfig(paths=[str(bad_corpus)], seq_len=8, max_chars=100_000, val_fraction=0.0)
    tok = TokenizerConfig(kind="char", vocab_size=128, min_frequency=1)
    td = token_datasets(data, tok, str(tmp_path / "run"))
    blocks = list(td.train.iter_rows())
    stats = td.stats()
    assert stats.documents_kept == len(KEPT), stats
    assert stats.dropped == {"invalid_utf8": 3, "invalid_json": 1, "too_long": 1}, stats.dropped
    assert stats.blocks == len(blocks) > 0
    assert _snapshot(bad_corpus) == before  # read-only: nothing written into the corpus


def test_100mb_single_line_is_skipped_while_streaming(bad_corpus):
    huge = bad_corpus / "huge.txt"
    cfg = DataConfig(paths=[str(huge)], max_chars=100_000)
    list(read_file_docs(str(bad_corpus / "good.txt"), "txt", cfg))  # warm up imports outside the trace
    tracemalloc.start()
    try:
        rows = [r for t in read_file_docs(str(huge), "txt", cfg) for r in t.column("reason").to_pylist()]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == ["too_long"]
    assert peak < 16 * (1 << 20), f"peak {peak / 2**20:.1f} MiB while skipping a 100 MiB line"


def test_unreadable_paths_named_directly_are_clear_errors(bad_corpus):
    with pytest.raises(CorpusNotFoundError, match="dangling.txt: no such file"):
        list_inputs([str(bad_corpus / "dangling.txt")])
    with pytest.raises(CorpusNotFoundError, match="dir.txt: matched no"):
        list_inputs([str(bad_corpus / "dir.txt")])
    listed = {Path(f.uri).name for f in list_inputs([str(bad_corpus)])}
    assert "dangling.txt" not in listed and "dir.txt" not in listed and "huge.txt" in listed


def test_corrupt_parquet_file_is_counted_not_raised(tmp_path):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(os.urandom(4096))
    tables = list(read_file_docs(str(bad), "parquet", DataConfig(paths=[str(bad)])))
    reasons = [r for t in tables for r in t.column("reason").to_pylist()]
    assert reasons and all(reasons), reasons
