"""Checkpoint completeness: what makes a reported checkpoint safe to resume from or export.

Every rank writes its DeepSpeed shard into its own temporary directory and Ray merges them into one
checkpoint folder. A folder only counts when rank 0's `raylm_meta.json` lists every rank's files with
their sizes, all of them are present at those sizes, and the `COMPLETE` marker (written last) exists.
Anything else (a crash mid-upload, a deleted or truncated shard) is skipped with a logged reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

META_FILE = "raylm_meta.json"
COMPLETE_MARKER = "COMPLETE"
HF_SUBDIR = "hf"  # config.json + tokenizer files, so a checkpoint exports on its own


def list_files(root: str | Path) -> dict[str, int]:
    """Relative path -> size of every file under `root` (what one rank wrote)."""
    base = Path(root)
    return {str(p.relative_to(base)): p.stat().st_size for p in sorted(base.rglob("*")) if p.is_file()}


def write_meta(ckpt_dir: str | Path, meta: dict[str, Any], files: dict[str, int]) -> None:
    """Rank 0: record metadata and the expected files of all ranks, then the marker, last."""
    d = Path(ckpt_dir)
    (d / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=1, sort_keys=True))
    (d / COMPLETE_MARKER).write_text("ok\n")


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / META_FILE).read_text())


def incompleteness(ckpt_dir: str | Path) -> str | None:
    """Why `ckpt_dir` cannot be used, or None when it is complete."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return "not a directory"
    if not (d / COMPLETE_MARKER).is_file():
        return f"no {COMPLETE_MARKER} marker (the save did not finish)"
    try:
        meta = read_meta(d)
    except (OSError, ValueError) as exc:
        return f"unreadable {META_FILE}: {exc}"
    for rel, size in meta.get("files", {}).items():
        f = d / rel
        if not f.is_file():
            return f"missing shard file {rel}"
        if f.stat().st_size != size:
            return f"shard file {rel} has {f.stat().st_size} bytes, expected {size}"
    return None


@dataclass(frozen=True)
class Candidate:
    path: Path
    step: int


def checkpoint_dirs(storage_dir: str | Path) -> list[Candidate]:
    """Ray's `checkpoint_*` folders under a run's training storage, newest step first."""
    found = [_candidate(d) for d in Path(storage_dir).glob("checkpoint_*") if d.is_dir()]
    return sorted(found, key=lambda c: (c.step, c.path.name), reverse=True)


def _candidate(path: Path) -> Candidate:
    try:
        return Candidate(path, int(read_meta(path)["step"]))
    except (OSError, ValueError, KeyError):
        return Candidate(path, -1)  # unreadable metadata: sorts last, reported as incomplete


def newest_complete(storage_dir: str | Path, also: str | Path | None = None) -> Path | None:
    """The complete checkpoint with the highest step under `storage_dir` (plus `also`); logs every skip.

    Disk, not only Ray's record, is searched: a worker can die after every rank's files and the
    marker landed but before Ray registered the checkpoint, and that checkpoint is still good.
    """
    candidates = checkpoint_dirs(storage_dir) if Path(storage_dir).is_dir() else []
    if also is not None and all(c.path != Path(also) for c in candidates):
        candidates = sorted([*candidates, _candidate(Path(also))], key=lambda c: c.step, reverse=True)
    for cand in candidates:
        reason = incompleteness(cand.path)
        if reason is None:
            return cand.path
        log.warning("skipping incomplete checkpoint %s: %s", cand.path, reason)
    return None


def skipped_reasons(storage_dir: str | Path, chosen: Path | None) -> list[tuple[str, str]]:
    """(path, reason) of the incomplete checkpoints newer than `chosen`: for the metrics log."""
    out = []
    chosen_step = read_meta(chosen)["step"] if chosen else -1
    for cand in checkpoint_dirs(storage_dir):
        reason = incompleteness(cand.path)
        if reason and (cand.step == -1 or cand.step > chosen_step):
            out.append((str(cand.path), reason))
    return out
