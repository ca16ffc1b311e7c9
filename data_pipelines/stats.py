"""What happened to the corpus: documents read, kept, dropped per reason, bytes, tokens, blocks.

The counts are taken where every document passes in a fixed order (the single packing actor of each
split), and reported to one `StatsLedger` actor, so the numbers are exact and describe exactly the
blocks that were produced, in stream mode as well as in materialise mode.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from rich.table import Table

# Reasons a document is skipped; the summary table lists them in this order.
DROP_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "missing_field",
    "non_string_field",
    "empty",
    "too_short",
    "too_long",
    "duplicate",
)


@dataclass
class CorpusStats:
    """Counts for one run; `prepare()` stores them in the manifest and training can print them."""

    documents_read: int = 0
    documents_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_kept: int = 0
    tokens: int = 0
    blocks: int = 0
    dropped_tail_tokens: int = 0
    train_documents: int = 0
    val_documents: int = 0
    train_blocks: int = 0
    val_blocks: int = 0

    def __add__(self, other: CorpusStats) -> CorpusStats:
        merged = {}
        for name, mine in asdict(self).items():
            theirs = getattr(other, name)
            merged[name] = dict(Counter(mine) + Counter(theirs)) if isinstance(mine, dict) else mine + theirs
        return CorpusStats(**merged)

    @property
    def documents_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusStats:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def table(self, title: str = "corpus summary") -> Table:
        """A rich table for the end of every run."""
        t = Table(title=title, show_header=True, header_style="bold")
        t.add_column("what")
        t.add_column("count", justify="right")
        rows: list[tuple[str, int]] = [
            ("documents read", self.documents_read),
            ("documents kept", self.documents_kept),
            ("  train / val", -1),
            ("documents dropped", self.documents_dropped),
        ]
        for label, value in rows:
            if value == -1:
                t.add_row(label, f"{self.train_documents:,} / {self.val_documents:,}")
            else:
                t.add_row(label, f"{value:,}")
        for reason in sorted(self.dropped, key=lambda r: (DROP_REASONS + (r,)).index(r)):
            t.add_row(f"  dropped: {reason}", f"{self.dropped[reason]:,}")
        t.add_row("bytes read", f"{self.bytes_read:,}")
        t.add_row("bytes kept (cleaned)", f"{self.bytes_kept:,}")
        t.add_row("tokens (incl. eos)", f"{self.tokens:,}")
        t.add_row("blocks (train / val)", f"{self.blocks:,} ({self.train_blocks:,} / {self.val_blocks:,})")
        t.add_row("dropped tail tokens", f"{self.dropped_tail_tokens:,}")
        return t


@ray.remote(num_cpus=0)
class StatsLedger:
    """Latest counts per split from the packer of the most recent execution of that split.

    A lazily executed dataset may run more than once (every epoch, train and val separately). Each
    execution starts a fresh packer that reports cumulative snapshots tagged with its start time, so
    the ledger keeps the newest execution's snapshot instead of adding executions up.
    """

    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, dict[str, Any]]] = {}

    def update(self, split: str, started_ns: int, snapshot: dict[str, Any]) -> None:
        current = self._latest.get(split)
        if current is None or started_ns >= current[0]:
            self._latest[split] = (started_ns, snapshot)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {split: snap for split, (_, snap) in self._latest.items()}


def new_ledger() -> ray.actor.ActorHandle:
    return StatsLedger.remote()


def combine(per_split: dict[str, dict[str, Any]]) -> CorpusStats:
    """One CorpusStats from the per-split snapshots of a ledger."""
    total = CorpusStats()
    for snap in per_split.values():
        total = total + CorpusStats.from_dict(snap)
    return total


def now_ns() -> int:
    return time.time_ns()
