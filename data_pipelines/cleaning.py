"""Document cleaning: Unicode normalisation, control characters, whitespace, length limits, content hash.

Cleaning is a pure function of one document, so it runs in parallel Ray Data tasks. De-duplication is
NOT done here: it needs the whole corpus and is done by the ordered packer (see `packing.py`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
import pyarrow as pa

from data_pipelines.config import DataConfig

# C0/C1 control characters except tab and newline (\r is turned into \n first), plus the BOM.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_HSPACE = re.compile(r"[^\S\n]+")
_AROUND_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str, cfg: DataConfig) -> tuple[str, str]:
    """Return (cleaned text, drop reason); the reason is "" for a kept document.

    Paragraph breaks survive as one blank line; runs of spaces/tabs become one space. Length is
    checked before cleaning too, so a 100 MB line is rejected without normalising it.
    """
    if len(text) > cfg.max_chars:
        return "", "too_long"
    if cfg.normalization != "none":
        text = unicodedata.normalize(cfg.normalization, text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _HSPACE.sub(" ", text)
    text = _AROUND_NEWLINE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text).strip()
    if not text:
        return "", "empty"
    if len(text) < cfg.min_chars:
        return "", "too_short"
    if len(text) > cfg.max_chars:
        return "", "too_long"
    return text, ""


def doc_hash(text: str) -> int:
    """64-bit content hash (signed, to fit an int64 column) used for de-duplication and the split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def is_val(h: int, val_fraction: float) -> bool:
    """Deterministic split: a document is held out when its hash falls in the lowest `val_fraction`."""
    return (h % (1 << 64)) / float(1 << 64) < val_fraction


def clean_batch(batch: pa.Table, cfg: DataConfig) -> pa.Table:
    """Ray Data UDF (batch_format="pyarrow"): raw documents → cleaned text, reason, hash, split.

    Input columns: text (raw; "" when the reader already dropped it), reason, bytes.
    Output adds clean_bytes, hash and val (bool); text becomes the cleaned text.
    """
    texts = batch.column("text").to_pylist()
    reasons = batch.column("reason").to_pylist()
    out_text, out_reason = [], []
    hashes = np.zeros(len(texts), dtype=np.int64)
    val = np.zeros(len(texts), dtype=bool)
    clean_bytes = np.zeros(len(texts), dtype=np.int64)
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        if not reason:
            text, reason = clean_text(text, cfg)
        if reason:
            text = ""
        else:
            hashes[i] = doc_hash(text)
            val[i] = is_val(int(hashes[i]), cfg.val_fraction)
            clean_bytes[i] = len(text.encode("utf-8"))
        out_text.append(text)
        out_reason.append(reason)
    return pa.table(
        {
            "text": pa.array(out_text, pa.large_string()),
            "reason": pa.array(out_reason, pa.string()),
            "bytes": batch.column("bytes"),
            "clean_bytes": clean_bytes,
            "hash": hashes,
            "val": val,
        }
    )
