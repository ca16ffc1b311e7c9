"""Document cleaning: Unicode normalisation, control characters, whitespace, length limits, content hash.

Cleaning is a pure function of one document, applied to whole Arrow batches with pyarrow compute
kernels (RE2 and ICU-free Unicode normalisation in C++), several times faster than a per-document
Python loop; the only per-document Python left is the content hash (one C call per document).
De-duplication is NOT done here: it needs the whole corpus and is done by the hash-partitioned
actors of `dedup.py`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipelines.config import DataConfig

# RE2 patterns, applied in this order. \r and Unicode line/paragraph separators become \n; C0/C1
# control characters except tab and newline, plus the BOM, are removed; runs of other whitespace
# (what Python's str.isspace calls whitespace, less \n) become one space. The patterns match only
# what they change (not every single space or newline): replacing a match costs more than scanning.
_LINE_BREAKS = r"\r\n?|[\x{2028}\x{2029}\x{85}]"
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x{9f}\x{feff}]"
_SPACE_NOT_BLANK = r"\t\x0b\x0c\x{a0}\x{1680}\x{2000}-\x{200a}\x{202f}\x{205f}\x{3000}"
_HSPACE = rf"[ {_SPACE_NOT_BLANK}]{{2,}}|[{_SPACE_NOT_BLANK}]"
_AROUND_NEWLINE = r" \n ?|\n "
_MANY_NEWLINES = r"\n{3,}"
_REPLACEMENTS = (
    (_LINE_BREAKS, "\n"),
    (_CONTROL, ""),
    (_HSPACE, " "),
    (_AROUND_NEWLINE, "\n"),
    (_MANY_NEWLINES, "\n\n"),
)
_ANY_REPLACEMENT = "|".join(f"(?:{pattern})" for pattern, _ in _REPLACEMENTS)


def clean_texts(texts: pa.Array, cfg: DataConfig) -> tuple[pa.Array, list[str]]:
    """Return (cleaned texts, drop reason per document; "" = kept) for an Arrow string array.

    Paragraph breaks survive as one blank line; runs of spaces/tabs become one space. Length is
    checked before cleaning too, so a 100 MB line is rejected without normalising it.
    """
    text, reasons, _ = _clean(texts, cfg)
    return text, reasons.tolist()


def _clean(texts: pa.Array, cfg: DataConfig) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """`clean_texts` with the reasons as a numpy object array, plus whether each was dropped."""
    texts = texts.cast(pa.large_string())
    too_long_raw = pc.greater(pc.utf8_length(texts), cfg.max_chars)
    text = pc.if_else(too_long_raw, "", texts)
    if cfg.normalization != "none":
        text = pc.utf8_normalize(text, form=cfg.normalization)
    text = _replace_all(text)
    text = pc.utf8_trim(text, characters=" \n")
    length = pc.utf8_length(text).to_numpy(zero_copy_only=False)
    raw_long = too_long_raw.to_numpy(zero_copy_only=False)
    reasons = np.full(len(text), "", dtype=object)
    reasons[length < cfg.min_chars] = "too_short"
    reasons[length == 0] = "empty"
    too_long = raw_long | (length > cfg.max_chars)
    reasons[too_long] = "too_long"
    dropped = too_long | (length < cfg.min_chars)  # min_chars >= 1, so this covers "empty"
    return pc.if_else(pa.array(dropped), "", text), reasons, dropped


def _replace_all(text: pa.Array) -> pa.Array:
    """The `_REPLACEMENTS` in order, on the documents that any of them matches; the others are
    left as they are, which is what the replacements would leave them (a document no pattern
    matches is not changed by the first, so not by the next either). One scan for all patterns
    costs about what one replacement pass does, and most documents of a clean corpus need none."""
    touched = pc.match_substring_regex(text, pattern=_ANY_REPLACEMENT).fill_null(False)
    rows = np.flatnonzero(touched.to_numpy(zero_copy_only=False))
    if not len(rows):
        return text
    if len(rows) == len(text):
        return _replace_all_rows(text)
    if isinstance(text, pa.ChunkedArray):  # replace_with_mask takes arrays
        text, touched = text.combine_chunks(), touched.combine_chunks()
    return pc.replace_with_mask(text, touched, _replace_all_rows(text.take(rows)))


def _replace_all_rows(text: pa.Array) -> pa.Array:
    for pattern, replacement in _REPLACEMENTS:
        text = pc.replace_substring_regex(text, pattern=pattern, replacement=replacement)
    return text


def clean_text(text: str, cfg: DataConfig) -> tuple[str, str]:
    """One document through `clean_texts`: (cleaned text, drop reason)."""
    cleaned, reasons = clean_texts(pa.array([text], pa.large_string()), cfg)
    return cleaned[0].as_py(), reasons[0]


def doc_hash(text: str) -> int:
    """64-bit content hash (signed, to fit an int64 column) used for de-duplication and the split."""
    return _hash_bytes(text.encode("utf-8"))


def _hash_bytes(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def _hash_all(texts: pa.Array) -> np.ndarray:
    """`doc_hash` of every text, as int64: the digests joined and read as big-endian integers at once."""
    data = texts.cast(pa.large_binary()).to_pylist()
    digests = b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in data)
    return np.frombuffer(digests, dtype=">i8").astype(np.int64)


def is_val(h: int | np.ndarray, val_fraction: float) -> bool | np.ndarray:
    """Deterministic split: a document is held out when its hash falls in the lowest `val_fraction`."""
    unsigned = np.asarray(h, dtype=np.int64).view(np.uint64)
    return unsigned / float(1 << 64) < val_fraction


def clean_batch(batch: pa.Table, cfg: DataConfig) -> pa.Table:
    """Ray Data UDF (batch_format="pyarrow"): raw documents → cleaned text, reason, hash, split.

    Input columns: text (raw; "" when the reader already dropped it), reason, bytes.
    Output adds clean_bytes, hash and val (bool); text becomes the cleaned text.
    """
    upstream = batch.column("reason")
    upstream_dropped = pc.not_equal(upstream, "").to_numpy(zero_copy_only=False)
    text, reasons, dropped = _clean(batch.column("text"), cfg)
    if upstream_dropped.any():
        reasons = np.where(upstream_dropped, upstream.to_numpy(zero_copy_only=False), reasons)
        text = pc.if_else(pa.array(upstream_dropped), "", text)
    kept = ~(upstream_dropped | dropped)
    hashes = np.zeros(len(kept), dtype=np.int64)  # 0 for a dropped document
    kept_rows = np.flatnonzero(kept)
    hashes[kept_rows] = _hash_all(text.take(kept_rows))
    val = kept & is_val(hashes, cfg.val_fraction)
    clean_bytes = pc.binary_length(text).to_numpy(zero_copy_only=False).astype(np.int64)
    return pa.table(
        {
            "text": text,
            "reason": pa.array(reasons, pa.string()),
            "bytes": batch.column("bytes"),
            "clean_bytes": clean_bytes,
            "hash": hashes,
            "val": val,
        }
    )


def training_documents(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: the kept documents of the training split (what the tokenizer is trained on).

    Lives here rather than in `pipeline` so that Ray workers running it never import transformers.
    """
    kept = pc.equal(batch.column("reason"), "")
    return batch.filter(pc.and_(kept, pc.invert(batch.column("val"))))
