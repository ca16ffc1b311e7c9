"""What happened to the corpus: documents read, kept, dropped per reason, bytes, tokens, blocks.

Each range task counts the documents of its range and split and reports them to one ledger actor
(`RangeCounts`) in a single call per range (not per batch, so the ledger is off the hot path), before the
range's last blocks leave the task. The totals are exact and describe exactly the blocks that were
produced, in stream mode as well as in materialise mode.
"""

from __future__ import annotations

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


class StaleRunError(RuntimeError):
    """A task of a finished run reported to a ledger or dedup partition that now serves another."""


class RangeCounts:
    """Counts per (split, range) from the range tasks; a split's total is the sum over its ranges.

    A lazily executed dataset may run more than once (every epoch, train and val separately), and a
    failed task may be retried. A range's counts are a function of the corpus and config alone, so a
    repeated report replaces the earlier one with the same numbers instead of adding it up again.

    A plain class, hosted by an actor: `StatsLedger` on its own, or the first dedup partition when
    the run de-duplicates (every Ray actor is a process start, about a second of CPU; see `dedup.py`).
    """

    def __init__(self, run: int = 0) -> None:
        self._ranges: dict[str, dict[int, dict[str, Any]]] = {}
        self.run = run  # the run counted now (a dedup partition serves one run after another)

    def add(self, split: str, range_index: int, counts: dict[str, Any], run: int = 0) -> None:
        """Record one range's counts; a report from another run (a task of an abandoned run still
        going after its partitions were handed to the next run) is refused."""
        self.check_run(run, "counts")
        self._ranges.setdefault(split, {})[range_index] = counts

    def check_run(self, run: int, what: str) -> None:
        """Refuse `what` (counts, hashes) of run `run` unless this actor serves that run now."""
        if run != self.run:
            raise StaleRunError(f"{what} of run {run} sent to an actor now serving run {self.run}")

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per split, the counts summed over the ranges reported so far."""
        out = {}
        for split, ranges in self._ranges.items():
            total = CorpusStats()
            for counts in ranges.values():
                total = total + CorpusStats.from_dict(counts)
            out[split] = total.to_dict()
        return out


@ray.remote(num_cpus=0)
class StatsLedger(RangeCounts):
    """The ledger of a run without de-duplication (one with it keeps its counts in a dedup partition)."""


def new_ledger() -> ray.actor.ActorHandle:
    return StatsLedger.remote()


def combine(per_split: dict[str, dict[str, Any]]) -> CorpusStats:
    """One CorpusStats from the per-split snapshots of a ledger."""
    total = CorpusStats()
    for snap in per_split.values():
        total = total + CorpusStats.from_dict(snap)
    return total
