"""Pure functions of the data pipeline (no Ray): cleaning, readers, split hash, demo corpus."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.cleaning import clean_text, doc_hash, is_val
from data_pipelines.config import DataConfig, DemoCorpusConfig
from data_pipelines.demo_corpus import write_demo_corpus
from data_pipelines.pipeline import corpus_hash
from data_pipelines.readers import (
    CorpusNotFoundError,
    _records,
    list_inputs,
    plan_reads,
    read_file_docs,
    read_range,
)


def _docs(uri: str, fmt: str, cfg: DataConfig) -> list[tuple[str, str]]:
    rows = []
    for table in read_file_docs(uri, fmt, cfg):
        rows += list(zip(table.column("text").to_pylist(), table.column("reason").to_pylist(), strict=True))
    return rows


def test_clean_text_normalises_and_collapses():
    cfg = DataConfig()
    text, reason = clean_text("  \ufb01ne\u00a0\u00a0day\r\n\r\n\r\n\r\nnext\x00 \tline \x1b\n", cfg)
    assert (text, reason) == ("fine day\n\nnext line", "")
    assert clean_text("\x00\x01 \n\n ", cfg) == ("", "empty")
    assert clean_text("ab", cfg.model_copy(update={"min_chars": 3})) == ("", "too_short")
    assert clean_text("abcd", cfg.model_copy(update={"max_chars": 3})) == ("", "too_long")
    assert clean_text("e\u0301", cfg.model_copy(update={"normalization": "none"}))[0] == "e\u0301"
    assert clean_text("e\u0301", cfg.model_copy(update={"normalization": "NFC"}))[0] == "\u00e9"


def test_split_is_a_pure_function_of_the_content():
    hashes = [doc_hash(f"document {i}") for i in range(2000)]
    assert hashes == [doc_hash(f"document {i}") for i in range(2000)]
    share = sum(is_val(h, 0.2) for h in hashes) / len(hashes)
    assert 0.15 < share < 0.25
    assert not any(is_val(h, 0.0) for h in hashes)


def test_txt_file_mode_versus_paragraph_mode(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("first para\nstill first\n\n\nsecond para\n \nthird\n")
    paragraphs = _docs(str(f), "txt", DataConfig(txt_document="paragraph"))
    assert [t for t, _ in paragraphs] == ["first para\nstill first", "second para", "third\n"]
    whole = _docs(str(f), "txt", DataConfig(txt_document="file"))
    assert len(whole) == 1 and whole[0][0].startswith("first para") and whole[0][0].endswith("third\n")


def test_long_record_is_skipped_without_holding_it():
    # 5 MB without a delimiter, then a normal record: the long one comes back as None.
    stream = io.BytesIO(b"a" * (5 << 20) + b"\nshort\n")
    from data_pipelines.readers import _NEWLINE

    assert list(_records(stream, _NEWLINE, max_bytes=1 << 20)) == [None, b"short"]


def test_parquet_column_nulls_and_wrong_types(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["one", None, "two"], "n": [1, 2, 3]}), path)
    cfg = DataConfig(text_field="body")
    assert _docs(str(path), "parquet", cfg) == [("one", ""), ("", "missing_field"), ("two", "")]
    assert [r for _, r in _docs(str(path), "parquet", DataConfig(text_field="n"))] == ["non_string_field"] * 3
    assert [r for _, r in _docs(str(path), "parquet", DataConfig(text_field="nope"))] == ["missing_field"] * 3


def test_parquet_binary_column_keeps_good_values_around_a_bad_one(tmp_path):
    """A batch is converted at once; a bad UTF-8 value costs only itself, in any batch size."""
    path = tmp_path / "b.parquet"
    values = [b"fine", b"bad \xff", None, b"caf\xc3\xa9"]
    pq.write_table(pa.table({"raw": pa.array(values, pa.binary())}), path)
    want = [("fine", ""), ("", "invalid_utf8"), ("", "missing_field"), ("caf\u00e9", "")]
    for batch in (1, 3, 2048):
        assert _docs(str(path), "parquet", DataConfig(text_field="raw", tokenize_batch_size=batch)) == want


def test_list_inputs_dirs_globs_uris_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.jsonl", "sub/c.parquet", "notes.csv", "_SUCCESS"):
        (tmp_path / name).write_text("x")
    found = list_inputs([str(tmp_path)])
    assert [(f.uri.rsplit("/", 1)[1], f.format) for f in found] == [
        ("a.jsonl", "jsonl"),
        ("b.txt", "txt"),
        ("c.parquet", "parquet"),
    ]
    uri = list_inputs([f"file://{tmp_path}/*.txt"])
    assert [f.uri for f in uri] == [f"file://{tmp_path}/b.txt"]
    assert list_inputs([str(tmp_path / "notes.csv")], "txt")[0].format == "txt"
    with pytest.raises(CorpusNotFoundError, match="no such file"):
        list_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(CorpusNotFoundError, match="matched no"):
        list_inputs([str(tmp_path / "*.md")])


def test_demo_corpus_is_deterministic_and_eval_is_held_out(tmp_path):
    cfg = DemoCorpusConfig(num_documents=200, num_sft_pairs=300, seed=3)
    a = write_demo_corpus(cfg, tmp_path / "a")
    b = write_demo_corpus(cfg, tmp_path / "b")
    for x, y in ((a.corpus, b.corpus), (a.sft_train, b.sft_train), (a.sft_eval, b.sft_eval)):
        assert x.read_bytes() == y.read_bytes()
    other = write_demo_corpus(cfg.model_copy(update={"seed": 4}), tmp_path / "c")
    assert other.corpus.read_bytes() != a.corpus.read_bytes()

    docs = [json.loads(line)["text"] for line in a.corpus.read_text().splitlines()]
    train = [json.loads(line) for line in a.sft_train.read_text().splitlines()]
    held = [json.loads(line) for line in a.sft_eval.read_text().splitlines()]
    assert len(docs) == 200 and len(train) == 300 and held
    assert {p["prompt"] for p in held}.isdisjoint(p["prompt"] for p in train)
    # Held out in phrasing only: every eval answer is a fact the training pairs teach.
    assert {p["response"] for p in held} <= {p["response"] for p in train}
    assert all(len(p["response"]) < 160 and p["response"].endswith(".") for p in train + held)


def test_corpus_hash_tracks_settings_and_files_but_not_performance_knobs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("some text")
    cfg = DataConfig(paths=[str(f)])
    base = corpus_hash(cfg, list_inputs(cfg.paths))
    assert (
        corpus_hash(
            cfg.model_copy(update={"tokenize_batch_size": 7, "mode": "materialize"}), list_inputs(cfg.paths)
        )
        == base
    )
    assert corpus_hash(cfg.model_copy(update={"min_chars": 5}), list_inputs(cfg.paths)) != base
    f.write_text("some other text")
    assert corpus_hash(cfg, list_inputs(cfg.paths)) != base


_PIECES = ["word", "two words", "\n", "\n\n", " \n", "\n \t\n", "\r\n", "\n\n\n", "é", "\x00", "  "]


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(_PIECES), max_size=120),
    fmt=st.sampled_from(["txt", "jsonl"]),
    chunk_bytes=st.integers(1, 64),
    raw_tail=st.binary(max_size=8),
)
def test_byte_ranges_read_exactly_what_one_sequential_read_gives(
    tmp_path_factory, pieces, fmt, chunk_bytes, raw_tail
):
    """A file read as many small byte ranges yields the same documents, in order, as one read: no
    paragraph or line is lost, doubled or cut at a range boundary, whatever the bytes there are."""
    text = "".join(pieces)
    if fmt == "jsonl":  # valid, broken and blank lines mixed
        body = "".join(json.dumps({"text": p}) + "\n" if i % 3 else p for i, p in enumerate(text.split("\n")))
    else:
        body = text
    path = tmp_path_factory.mktemp("ranges") / f"corpus.{fmt}"
    path.write_bytes(body.encode("utf-8") + raw_tail)
    cfg = DataConfig(read_chunk_mb=chunk_bytes / (1 << 20), max_chars=40)
    whole = _docs(str(path), fmt, cfg)
    items = plan_reads(list_inputs([str(path)]), cfg)
    pieces_read = []
    for item in items:
        for table in read_range(item, cfg):
            pieces_read += list(
                zip(table.column("text").to_pylist(), table.column("reason").to_pylist(), strict=True)
            )
    assert pieces_read == whole
    assert len(items) == max(1, -(-path.stat().st_size // chunk_bytes))


def test_a_large_file_is_shared_between_range_tasks(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"paragraph {i}\nline two\n\n" for i in range(400)))
    cfg = DataConfig(read_chunk_mb=2048 / (1 << 20))
    items = plan_reads(list_inputs([str(path)]), cfg)
    per_range = [sum(t.num_rows for t in read_range(i, cfg)) for i in items]
    assert len(items) == -(-path.stat().st_size // 2048) and all(n > 50 for n in per_range)
    assert sum(per_range) == 400


def test_read_plan_groups_small_files_cuts_large_ones_and_ignores_the_cluster(tmp_path):
    """The plan is a function of the corpus and config only (a resume on another cluster sees the
    same ranges): small files share a range in corpus order, a large splittable file is cut."""
    for name, size in (("a.txt", 300), ("b.txt", 300), ("c.txt", 5000), ("d.jsonl", 200), ("e.txt", 900)):
        (tmp_path / name).write_text("x\n\n" * (size // 3))
    files = list_inputs([str(tmp_path)])
    cfg = DataConfig(read_chunk_mb=1000 / (1 << 20))
    plan = plan_reads(files, cfg)
    assert plan == plan_reads(list_inputs([str(tmp_path)]), cfg)
    layout = [
        [(p["uri"].rsplit("/", 1)[1], p["end"] is not None) for p in json.loads(r["pieces"])] for r in plan
    ]
    assert [r["index"] for r in plan] == list(range(len(plan)))
    assert layout[0] == [("a.txt", False), ("b.txt", False)]  # grouped until a chunk is full
    assert all(row == [("c.txt", True)] for row in layout[1:6])  # 5000 bytes in 1000-byte ranges
    assert layout[6:] == [[("d.jsonl", False), ("e.txt", False)]]
    default = plan_reads(files, DataConfig())  # 1/64 of 6.7 kB is under the 1 MiB floor: one range
    assert len(default) == 1 and len(json.loads(default[0]["pieces"])) == 5
