"""Exact de-duplication spread over several actors, each owning the documents whose hash falls in it.

A document is kept when it is the *first occurrence* of its content in corpus order. Corpus order is
the read plan's: position = (range index, document index within the range). Each partition actor
stores, for every hash it owns, the smallest position reported for it so far, so:

1. every range task reports the hashes and positions of its cleaned documents to every partition
   (one call per partition per range, even when it has no hash there);
2. a partition answers range i once every range before i has reported to it: from then on no later
   report can lower the stored minimum of a hash in range i (later ranges have larger positions);
3. a document is a duplicate exactly when its hash's minimum is not its own position.

The answer depends on the corpus and the plan alone, not on task timing, and reporting the same range
again (a retried task, the next epoch, the val split reading the same ranges) changes nothing, so one
set of partitions serves every execution of a dataset. No process sees every hash: a partition holds
the unique documents of its share of the hash space, about `ENTRY_BYTES` each (a Python dict of two
64-bit ints), i.e. `ENTRY_BYTES × unique documents / partitions` plus one Ray worker's base memory.

Step 2 waits only on ranges that were started earlier (Ray Data dispatches a dataset's blocks in
order) and whose read + clean is a small part of their work, so the wait is short; a range that never
reports (its task failed for good) fails the waiters after `WAIT_S` instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import ray

ENTRY_BYTES = 120  # measured: key int + value int + dict slot (100-150 B over a resize cycle)
WAIT_S = 600.0
_RANGE_SHIFT = 32  # position = range index << 32 | document index within the range


class DedupTimeoutError(RuntimeError):
    """A range waited too long for the ranges before it (one of them never reported)."""


@ray.remote(num_cpus=0, max_restarts=0)
class DedupPartition:
    """One share of the hash space: smallest position per hash, and which ranges have reported.

    An async actor, so the calls of later ranges can wait for earlier ones without blocking them.
    A lost partition would have lost its minima; it is not restarted and the execution fails
    (training resumes from its last checkpoint) rather than silently keeping duplicates.
    """

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        self.reported: set[int] = set()
        self.contiguous = 0  # ranges 0 .. contiguous-1 have all reported
        self.changed = asyncio.Condition()

    async def first_occurrences(self, range_index: int, hashes: np.ndarray, positions: np.ndarray):
        """Record (hash, position) pairs of one range (positions ascending); once ranges < range_index
        have reported, return, per pair, whether that position is the hash's first occurrence."""
        keys, first = hashes.tolist(), self.first
        # Dict operations in C: the earliest position per hash within the call (positions ascend, so
        # inserting in reverse leaves the first), then the smaller of that and any stored minimum.
        mine = dict(zip(reversed(keys), reversed(positions.tolist()), strict=True))
        for h in mine.keys() & first.keys():
            mine[h] = min(mine[h], first[h])
        first.update(mine)
        async with self.changed:
            self.reported.add(range_index)
            while self.contiguous in self.reported:
                self.contiguous += 1
            self.changed.notify_all()
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.contiguous >= range_index), WAIT_S)
            except TimeoutError:
                raise DedupTimeoutError(
                    f"range {range_index} waited {WAIT_S:.0f} s for range {self.contiguous} to report "
                    "its document hashes (did its task fail?)"
                ) from None
        return np.fromiter(map(first.__getitem__, keys), np.int64, len(keys)) == positions

    def memory(self) -> dict[str, int]:
        """Unique hashes held, the bytes of the table holding them, and this process's resident memory
        (for the benchmark's report; walks the table, so not for the hot path)."""
        import psutil

        table = sys.getsizeof(self.first) + sum(
            sys.getsizeof(k) + sys.getsizeof(v) for k, v in self.first.items()
        )
        return {
            "entries": len(self.first),
            "table_bytes": table,
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
        }


class DedupIndex:
    """Handles on the partitions; pickled into every range task."""

    def __init__(self, partitions: int) -> None:
        # SPREAD: on a multi-node cluster the partitions' memory lands on different nodes.
        self.actors = [
            DedupPartition.options(scheduling_strategy="SPREAD").remote() for _ in range(partitions)
        ]

    def first_occurrences(self, range_index: int, hashes: np.ndarray, doc_index: np.ndarray) -> np.ndarray:
        """Whether each document (hash, index within range `range_index`) is its content's first
        occurrence in the corpus."""
        positions = (np.int64(range_index) << _RANGE_SHIFT) + doc_index.astype(np.int64)
        part = hashes.view(np.uint64) % np.uint64(len(self.actors))
        refs, members = [], []
        for p, actor in enumerate(self.actors):
            idx = np.flatnonzero(part == p)
            members.append(idx)
            refs.append(actor.first_occurrences.remote(range_index, hashes[idx], positions[idx]))
        keep = np.zeros(len(hashes), dtype=bool)
        for idx, answer in zip(members, ray.get(refs), strict=True):
            keep[idx] = answer
        return keep

    def memory(self) -> list[dict[str, int]]:
        return ray.get([a.memory.remote() for a in self.actors])
