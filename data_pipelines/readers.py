"""Corpus reading: list input files (local paths, globs, directories, pyarrow URIs) and turn each into
raw documents, defensively.

Ray's own `read_json`/`read_text` raise on the first bad line or invalid UTF-8, and a run must never
crash on broken input, so files are listed here and read by our own Ray Data UDF: every record that
cannot become a document is emitted with a drop reason (counted downstream) instead of text. Files are
streamed in 1 MiB chunks and a record longer than the size bound is skipped without being held, so a
single 100 MB line costs neither a crash nor 100 MB of memory.

The corpus is planned once into ranges of about one chunk each (`plan_reads`): a large uncompressed
.jsonl or paragraph-mode .txt file is cut into byte ranges, small files are grouped. A byte range
starts at a record boundary found from its planned offset alone (the next line start for jsonl, the
next blank line for paragraphs), so neighbouring ranges agree on where one ends and the next begins,
and the documents come out exactly as one sequential read would give them.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipelines.config import DataConfig

_FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_CHUNK_BYTES = 1 << 20
_OUT_BYTES = 8 << 20  # most text per emitted table (data.tokenize_batch_size bounds the documents)
_PARAGRAPH_BREAK = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
_NEWLINE = re.compile(rb"\n")
_HSPACE = b" \t\r\f\v"
RAW_SCHEMA = pa.schema([("text", pa.large_string()), ("reason", pa.string()), ("bytes", pa.int64())])


# Standard variables the AWS SDK (and so pyarrow's S3 filesystem) and Google Cloud Storage read.
OBJECT_STORE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def object_store_env() -> dict[str, str]:
    """The object-store variables set in this process, for Ray workers that read or write URIs.

    Ray workers inherit the environment of the node they run on, not the driver's; passing these on
    (as runtime_env env_vars) lets a corpus and shards on s3:// work from every node with the
    credentials the user configured, while a cluster whose nodes have their own (an IAM role, a
    mounted config) gets nothing extra when the driver sets none.
    """
    return {k: os.environ[k] for k in OBJECT_STORE_ENV if os.environ.get(k)}


class CorpusNotFoundError(FileNotFoundError):
    """A configured path matched no readable corpus file."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # a local absolute path, or scheme://path for other filesystems
    format: str
    size: int
    mtime_ns: int


def _resolve(path: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns a path back into a reopenable URI)."""
    if "://" in path:
        scheme = path.split("://", 1)[0]
        fs, inner = pafs.FileSystem.from_uri(path)
        if scheme == "file":
            return fs, inner, "file://"
        return fs, inner, f"{scheme}://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), ""


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, inner, _ = _resolve(uri)
    return fs, inner


def format_of(name: str, forced: str) -> str | None:
    if forced != "auto":
        return forced
    stem = name
    for suffix in _COMPRESSED:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return _FORMATS.get(os.path.splitext(stem)[1].lower())


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in path.split("/") if part)


def list_inputs(paths: list[str], forced_format: str = "auto") -> list[InputFile]:
    """Every corpus file the configured paths name, in a stable (sorted) order.

    A directory contributes its visible files whose format is known (any file when the format is
    forced); a glob (`*`, `?`, `[`) is matched against the full path; a path that matches nothing is an
    error, since silently training on less data than configured is worse than stopping.
    """
    found: dict[str, InputFile] = {}
    for raw in paths:
        fs, inner, prefix = _resolve(raw)
        if any(c in inner for c in "*?["):
            base = inner
            while any(c in base for c in "*?["):
                base = base.rsplit("/", 1)[0] or "/"
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, inner)
            ]
        else:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.Directory:
                infos = [
                    i
                    for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                    if i.type == pafs.FileType.File and _visible(i.path[len(inner) :])
                ]
            elif info.type == pafs.FileType.File:
                infos = [info]
                if format_of(info.path, forced_format) is None:
                    raise CorpusNotFoundError(
                        f"{raw}: unknown corpus format (use .txt, .jsonl or .parquet, or set data.format)"
                    )
            else:
                raise CorpusNotFoundError(f"{raw}: no such file or directory")
        matched = 0
        for i in infos:
            fmt = format_of(i.path, forced_format)
            if fmt is None:
                continue
            uri = prefix + i.path
            found[uri] = InputFile(uri, fmt, int(i.size or 0), int(i.mtime_ns or 0))
            matched += 1
        if not matched:
            raise CorpusNotFoundError(f"{raw}: matched no .txt, .jsonl or .parquet file")
    return [found[k] for k in sorted(found)]


def _record_chunks(stream, delimiter: re.Pattern[bytes], max_bytes: int) -> Iterator[list[bytes | None]]:
    """Split a byte stream at `delimiter`, one list of records per chunk read; a record longer than
    `max_bytes` is skipped and stands as None."""
    buf = b""
    skipping = False
    keep = 64  # bytes kept while skipping, so a delimiter that straddles two chunks is still found
    while chunk := stream.read(_CHUNK_BYTES):
        parts = delimiter.split(buf + chunk)  # one C-level split per chunk; the last part is unfinished
        buf = parts.pop()
        if parts and skipping:
            parts[0] = None  # the end of the record that was being skipped
            skipping = False
        if parts:
            yield parts
        if len(buf) > max_bytes:
            skipping = True
            buf = buf[-keep:]
    if skipping:
        yield [None]
    elif buf:
        yield [buf]


def _records(stream, delimiter: re.Pattern[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """`_record_chunks`, one record at a time."""
    for parts in _record_chunks(stream, delimiter, max_bytes):
        yield from parts


class _Out:
    """Accumulates (text, reason, bytes) rows and hands them out as Arrow tables of bounded size."""

    def __init__(self, max_docs: int) -> None:
        self.max_docs = max_docs
        self.text: list[str] = []
        self.reason: list[str] = []
        self.nbytes: list[int] = []
        self.pending = 0

    def add(self, text: str, reason: str, nbytes: int) -> pa.Table | None:
        self.text.append(text)
        self.reason.append(reason)
        self.nbytes.append(nbytes)
        self.pending += len(text)
        if len(self.text) >= self.max_docs or self.pending >= _OUT_BYTES:
            return self.flush()
        return None

    def flush(self) -> pa.Table | None:
        if not self.text:
            return None
        table = pa.table([self.text, self.reason, self.nbytes], schema=RAW_SCHEMA)
        self.text, self.reason, self.nbytes, self.pending = [], [], [], 0
        return table


def _decode(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return "", "invalid_utf8"


def _txt_tables(stream, cfg: DataConfig) -> Iterator[pa.Table]:
    """A .txt stream's documents as Arrow tables of at most `tokenize_batch_size` rows, a chunk of
    records at a time: one UTF-8 check and one conversion per chunk, not a Python step per document."""
    # A char is at most 4 UTF-8 bytes, so a longer record certainly exceeds max_chars.
    max_bytes = 4 * cfg.max_chars
    paragraph = cfg.txt_document == "paragraph"
    delimiter = _PARAGRAPH_BREAK if paragraph else re.compile(rb"(?!)")
    for recs in _record_chunks(stream, delimiter, max_bytes):
        if paragraph:  # leading/trailing blank space of a file is not a paragraph
            recs = [r for r in recs if r is None or (r and not r.isspace())]
        if recs:
            table = _txt_table(recs)
            for lo in range(0, len(table), cfg.tokenize_batch_size):
                yield table.slice(lo, cfg.tokenize_batch_size)


def _txt_table(recs: list[bytes | None]) -> pa.Table:
    """Raw rows of .txt records; a chunk with an over-long record or invalid UTF-8 (rare) is
    converted record by record, so only the bad records get a reason."""
    if None not in recs:
        raw = pa.array(recs, pa.large_binary())
        try:
            text = raw.cast(pa.large_string())  # validates UTF-8
        except pa.ArrowInvalid:
            pass
        else:
            nbytes = pc.binary_length(raw).cast(pa.int64())
            return pa.table([text, pa.repeat("", len(recs)).cast(pa.string()), nbytes], schema=RAW_SCHEMA)
    rows = [("", "too_long", 0) if r is None else (*_decode(r), len(r)) for r in recs]
    text, reason, nbytes = zip(*rows, strict=True)
    return pa.table([list(text), list(reason), list(nbytes)], schema=RAW_SCHEMA)


def _jsonl_docs(stream, cfg: DataConfig) -> Iterator[tuple[str, str, int]]:
    # JSON escapes (\uXXXX) take up to 6 bytes per char; other fields add some more.
    max_bytes = 8 * cfg.max_chars + (1 << 20)
    for rec in _records(stream, _NEWLINE, max_bytes):
        if rec is None:
            yield "", "too_long", 0
            continue
        if not rec.strip():
            continue  # blank lines separate nothing in jsonl
        line, reason = _decode(rec)
        if reason:
            yield "", reason, len(rec)
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            yield "", "invalid_json", len(rec)
            continue
        value = obj.get(cfg.text_field) if isinstance(obj, dict) else None
        if value is None:
            yield "", "missing_field", len(rec)
        elif not isinstance(value, str):
            yield "", "non_string_field", len(rec)
        else:
            yield value, "", len(value.encode("utf-8"))


def _parquet_tables(fs: pafs.FileSystem, path: str, cfg: DataConfig) -> Iterator[pa.Table]:
    """A Parquet file's text column as raw tables of `tokenize_batch_size` rows, a column batch at a
    time (Arrow casts and length kernels, no Python step per document)."""
    with fs.open_input_file(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError):  # not a Parquet file (corrupt, truncated): count, go on
            yield _uniform_rows(1, "unreadable_file")
            return
        if cfg.text_field not in pf.schema_arrow.names:
            rows = pf.metadata.num_rows
            for lo in range(0, rows, cfg.tokenize_batch_size):
                yield _uniform_rows(min(cfg.tokenize_batch_size, rows - lo), "missing_field")
            return
        for batch in pf.iter_batches(batch_size=cfg.tokenize_batch_size, columns=[cfg.text_field]):
            yield _parquet_table(batch.column(0))


def _uniform_rows(n: int, reason: str) -> pa.Table:
    """`n` documents dropped for the same reason."""
    return _dropped_rows(pa.repeat(pa.scalar(reason), n))


def _dropped_rows(reasons: pa.Array) -> pa.Table:
    """Rows without text, one per drop reason."""
    n = len(reasons)
    empty = pa.repeat(pa.scalar("", pa.large_string()), n)
    return pa.table([empty, reasons.cast(pa.string()), pa.repeat(pa.scalar(0), n)], schema=RAW_SCHEMA)


def _parquet_table(column: pa.Array) -> pa.Table:
    """Raw rows of one batch of a Parquet text column: strings are documents, null is
    missing_field, binary must be UTF-8 (a batch with a bad value goes value by value, so only the
    bad ones get invalid_utf8), anything else is non_string_field."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    kind = column.type
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
    if not (textual or binary):
        return _dropped_rows(pc.if_else(column.is_valid(), "non_string_field", "missing_field"))
    try:
        text = column.cast(pa.large_string())  # validates UTF-8 for binary
    except pa.ArrowInvalid:
        rows = [("", "missing_field", 0) if v is None else (*_decode(v), len(v)) for v in column.to_pylist()]
        texts, reasons, nbytes = zip(*rows, strict=True)
        return pa.table([list(texts), list(reasons), list(nbytes)], schema=RAW_SCHEMA)
    valid = column.is_valid()
    return pa.table(
        [
            text.fill_null(""),
            pc.if_else(valid, "", "missing_field").cast(pa.string()),
            pc.binary_length(text).cast(pa.int64()).fill_null(0),
        ],
        schema=RAW_SCHEMA,
    )


def splittable(f: InputFile, cfg: DataConfig) -> bool:
    """Whether a file can be read as several byte ranges: uncompressed, one record per line or paragraph."""
    if f.uri.endswith(_COMPRESSED):
        return False
    return f.format == "jsonl" or (f.format == "txt" and cfg.txt_document == "paragraph")


def _chunk_bytes(files: list[InputFile], cfg: DataConfig) -> int:
    """Bytes per read range: `data.read_chunk_mb`, else 1/64 of the corpus clamped to 1–64 MiB.

    A function of the corpus and the config only, never of the cluster: the ranges decide where
    packing drops its per-range tails, so the same corpus gives the same blocks on any cluster, and a
    resumed run on a cluster with a different CPU count continues exactly.
    """
    if cfg.read_chunk_mb:
        return max(1, int(cfg.read_chunk_mb * (1 << 20)))
    total = sum(f.size for f in files)
    return min(64 << 20, max(1 << 20, total // 64))


def plan_reads(files: list[InputFile], cfg: DataConfig) -> list[dict[str, Any]]:
    """The read plan: ranges of about one chunk each, in corpus order, as rows {"index", "pieces"}.

    `pieces` is a JSON list of (uri, format, start, end) file pieces read one after the other: a large
    splittable file is cut into chunk-sized byte ranges (`end` set), and small or unsplittable files
    are grouped whole (`end` None) until the range holds about one chunk, so a corpus of many small
    files neither starts a task per file nor drops a packing tail per file.
    """
    chunk = _chunk_bytes(files, cfg)
    ranges: list[list[dict[str, Any]]] = []
    group: list[dict[str, Any]] = []
    group_bytes = 0
    for f in files:
        if splittable(f, cfg) and f.size > chunk:
            if group:
                ranges.append(group)
                group, group_bytes = [], 0
            bounds = [*range(0, f.size, chunk), f.size]
            ranges += [[_piece(f, a, b)] for a, b in itertools.pairwise(bounds)]
            continue
        group.append(_piece(f, 0, None))
        group_bytes += f.size
        if group_bytes >= chunk:
            ranges.append(group)
            group, group_bytes = [], 0
    if group:
        ranges.append(group)
    return [{"index": i, "pieces": json.dumps(pieces)} for i, pieces in enumerate(ranges)]


def _piece(f: InputFile, start: int, end: int | None) -> dict[str, Any]:
    return {"uri": f.uri, "format": f.format, "start": start, "end": end}


def _boundary(f, offset: int, size: int, paragraph: bool) -> int:
    """The first record boundary at or after `offset`: the next line start (jsonl) or the start of the
    next blank line (paragraphs). Both neighbours compute it from the same bytes, so they agree."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    f.seek(offset - 1)
    pos = offset - 1
    line_start = None  # start of the current line once a newline at or after offset - 1 is passed
    blank = True
    while chunk := f.read(_CHUNK_BYTES):
        i = 0
        while True:
            j = chunk.find(b"\n", i)
            if line_start is not None and blank and chunk[i : j if j >= 0 else len(chunk)].strip(_HSPACE):
                blank = False
            if j < 0:
                break
            if line_start is not None and blank:
                return line_start
            line_start, blank, i = pos + j + 1, True, j + 1
            if not paragraph:
                return line_start
        pos += len(chunk)
    return size


class _Range:
    """A readable stream over bytes [start, end) of a file, with optional bytes before and after.

    Paragraph ranges get a newline on each inner side, so the blank line a range was cut at still reads
    as a paragraph break from both sides.
    """

    def __init__(self, f, start: int, end: int, prefix: bytes, suffix: bytes) -> None:
        f.seek(start)
        self.f, self.left, self.pending = f, end - start, prefix
        self.suffix = suffix

    def read(self, n: int) -> bytes:
        if self.pending:
            out, self.pending = self.pending, b""
            return out
        if self.left > 0:
            out = self.f.read(min(n, self.left))
            self.left -= len(out)
            if out:
                return out
            self.left = 0
        out, self.suffix = self.suffix, b""
        return out


def _text_tables(stream, fmt: str, cfg: DataConfig) -> Iterator[pa.Table]:
    if fmt == "txt":
        return _txt_tables(stream, cfg)
    return _tables(_jsonl_docs(stream, cfg), _Out(cfg.tokenize_batch_size))


def _range_tables(fs, path: str, fmt: str, cfg: DataConfig, start: int, end: int) -> Iterator[pa.Table]:
    with fs.open_input_file(path) as f:
        size = f.size()
        paragraph = fmt == "txt"
        lo, hi = _boundary(f, start, size, paragraph), _boundary(f, end, size, paragraph)
        if lo >= hi:
            return
        prefix = b"\n" if paragraph and lo > 0 else b""
        suffix = b"\n" if paragraph and hi < size else b""
        yield from _text_tables(_Range(f, lo, hi, prefix, suffix), fmt, cfg)


def read_file_docs(
    uri: str, fmt: str, cfg: DataConfig, start: int = 0, end: int | None = None
) -> Iterator[pa.Table]:
    """Raw documents of one file (or of the records that begin in bytes [start, end) of a splittable
    file) as Arrow tables (text, reason, bytes); never raises on bad content."""
    fs, path = open_uri(uri)
    if fmt == "parquet":
        yield from _parquet_tables(fs, path, cfg)
    elif end is not None:  # a byte range `plan_reads` cut from a large splittable file
        yield from _range_tables(fs, path, fmt, cfg, start, end)
    else:
        with fs.open_input_stream(path, compression="detect") as stream:
            yield from _text_tables(stream, fmt, cfg)


def _tables(docs: Iterator[tuple[str, str, int]], out: _Out) -> Iterator[pa.Table]:
    for text, reason, nbytes in docs:
        if (table := out.add(text, reason, nbytes)) is not None:
            yield table
    if (table := out.flush()) is not None:
        yield table


def read_range(item: dict[str, Any], cfg: DataConfig) -> Iterator[pa.Table]:
    """Raw document tables of one planned range (a row of `plan_reads`), its pieces in order."""
    for piece in json.loads(item["pieces"]):
        yield from read_file_docs(piece["uri"], piece["format"], cfg, piece["start"], piece["end"])


def read_ranges_udf(batch: pa.Table, cfg: DataConfig) -> Iterator[pa.Table]:
    """Ray Data map_batches UDF: planned ranges → raw document tables."""
    for item in batch.to_pylist():
        yield from read_range(item, cfg)
