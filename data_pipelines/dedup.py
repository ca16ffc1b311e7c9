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
the unique documents of its share of the hash space in a numpy hash table (`FirstPositions`, no
per-document Python), sized once for the first range's documents × the plan's ranges: 32-64 bytes
per document of its share, and up to `PEAK_ENTRY_BYTES` per unique document at the moment a table
sized too small doubles; plus one Ray worker's base memory.

Step 2 waits only on ranges that were started earlier (Ray Data dispatches a dataset's blocks in
order) and whose read + clean is a small part of their work, so the wait is short; a range that never
reports (its task failed for good) fails the waiters after `WAIT_S` instead of hanging.

Each partition is an actor, a Ray worker process whose start costs about 0.6 CPU-s (3% of a 50 MB
run on two cores). When a run's `DedupIndex` is garbage-collected (no dataset, TokenData or caller
holds it any more), its partitions, emptied, wait in this driver for the next run to take them, as
Ray keeps task workers for the next task. Every call carries the run's number, so a task of an
abandoned run that is still going cannot touch the run a partition serves now (`StaleRunError`).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import weakref

import numpy as np
import ray

from data_pipelines.stats import RangeCounts

PEAK_ENTRY_BYTES = 96  # 16-byte slots, at most half taken; old + new table while doubling
WAIT_S = 600.0
_RANGE_SHIFT = 32  # position = range index << 32 | document index within the range
_EMPTY = -1  # position of a free slot (real positions are >= 0)
_CLAIMED = np.iinfo(np.int64).max  # a slot just taken, before its position is recorded
_MAX_LOAD = 0.5  # entries per slot before the table doubles: probes stay ~1.5 slots long
_MAX_FILL = 0.75  # a call that could take the table past this doubles it first (never full)
_REHASH_SLOTS = 1 << 20  # old slots re-inserted per step of a resize (bounds its temporaries)
_MAX_IDLE = 8  # idle partitions kept per Ray session for the next run; the others are killed
_RUNS = itertools.count(1)  # run numbers of this driver (0: a partition serving no run)
_IDLE: dict[str, list[ray.actor.ActorHandle]] = {}  # Ray session → emptied partitions of ended runs
_LIVE: weakref.WeakSet[DedupIndex] = weakref.WeakSet()  # indices not garbage-collected yet


class DedupTimeoutError(RuntimeError):
    """A range waited too long for the ranges before it (one of them never reported)."""


class DedupPartitionLostError(RuntimeError):
    """A dedup partition died (usually out of memory); its minima are gone, so the run cannot go on."""


class FirstPositions:
    """Smallest position seen per 64-bit hash: an open-addressing table of two int64 columns.

    Every operation works on a whole range's hashes at once in numpy, with no per-document Python:
    the hashes are uniform already (blake2b), so a slot is the hash's low bits, and collisions are
    resolved by linear probing in vectorised rounds (each round settles every hash that found its
    key or claimed a free slot; the rest move one slot on). There are no deletions, so a probe that
    reaches a free slot proves the hash absent.

    Memory: 16 bytes per slot, and the table doubles when more than `_MAX_LOAD` of its slots are
    taken, so it holds 32-64 bytes per unique hash; while it doubles, the old and new tables exist
    together (96 bytes per hash at that moment).
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        self.table = np.empty((capacity, 2), np.int64)  # columns: hash, position
        self.table[:, 1] = _EMPTY
        self.count = 0
        self.generation = 0  # bumped by every resize: slots found before it are stale

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def slots(self, hashes: np.ndarray, claim: bool) -> np.ndarray:
        """The slot of each hash; with `claim`, absent hashes take a free slot (position `_CLAIMED`),
        else every hash must be present. Repeated hashes get the same slot."""
        keys, pos = self.table[:, 0], self.table[:, 1]
        mask = len(pos) - 1
        found = (hashes.view(np.uint64) & np.uint64(mask)).astype(np.int64)
        todo, want, slot = np.arange(len(hashes)), hashes, found.copy()
        while len(todo):
            taken = pos[slot] != _EMPTY
            done = taken & (keys[slot] == want)
            if claim and not taken.all():
                # Free slots: every hash aiming at one writes its own number there; the write that
                # lands last wins the slot, the others see it taken in the next round.
                free = np.flatnonzero(~taken)
                pos[slot[free]] = free
                won = free[pos[slot[free]] == free]
                keys[slot[won]] = want[won]
                pos[slot[won]] = _CLAIMED
                self.count += len(won)
                done[won] = True
            elif not claim and not taken.all():
                raise KeyError("a hash looked up was never recorded")
            found[todo[done]] = slot[done]
            # A slot held by another hash: move on; a free slot lost to another hash: look again.
            move = taken & ~done
            slot[move] = (slot[move] + 1) & mask
            keep = ~done
            todo, want, slot = todo[keep], want[keep], slot[keep]
        return found

    def record(self, hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Lower each hash's stored position to `positions` where smaller; return their slots (valid
        until the next resize, see `generation`)."""
        if self.count + len(hashes) > len(self.table) * _MAX_FILL:  # room for all, even if all new
            self.reserve(self.count + len(hashes))
        found = self.slots(hashes, claim=True)
        np.minimum.at(self.table[:, 1], found, positions)
        if self.count > len(self.table) * _MAX_LOAD:  # grown by the hashes that were new
            self.reserve(self.count)
            found = self.slots(hashes, claim=False)
        return found

    def reserve(self, entries: int) -> None:
        """Double the table until `entries` fit under the load limit, re-inserting in steps."""
        capacity = len(self.table)
        if entries <= capacity * _MAX_LOAD:
            return
        while entries > capacity * _MAX_LOAD:
            capacity *= 2
        old, self.table = self.table, np.empty((capacity, 2), np.int64)
        self.table[:, 1] = _EMPTY
        self.count = 0
        for lo in range(0, len(old), _REHASH_SLOTS):
            step = old[lo : lo + _REHASH_SLOTS]
            step = step[step[:, 1] != _EMPTY]
            self.table[self.slots(step[:, 0], claim=True), 1] = step[:, 1]
        self.generation += 1


@ray.remote(num_cpus=0, max_restarts=0)
class DedupPartition(RangeCounts):
    """One share of the hash space: smallest position per hash, and which ranges have reported.

    An async actor, so the calls of later ranges can wait for earlier ones without blocking them.
    A lost partition would have lost its minima; it is not restarted, and the range tasks fail with
    `DedupPartitionLostError` rather than silently keeping duplicates.

    It is a stats ledger too (`RangeCounts`), and the run's ledger is its first partition
    (`DedupIndex.ledger`): a separate ledger actor is one more process to start per run, about a
    second of CPU, 4% of a 50 MB run on two cores.
    """

    def __init__(self, ranges: int = 0, run: int = 0) -> None:
        self._reset(run, ranges)

    async def start(self, run: int, ranges: int = 0) -> None:
        """Serve run `run` from scratch: every hash and count of the run before is forgotten (its
        table freed), and its waiting calls wake up to a `StaleRunError`."""
        before = self.changed
        self._reset(run, ranges)
        async with before:
            before.notify_all()

    async def end(self, run: int) -> None:
        """Run `run` ended: free its table now rather than when the next run starts, unless this
        partition serves a later run already. The check matters because an async actor does not keep
        call order: the next run's `start`, sent after this call, may execute before it."""
        if self.run == run:
            await self.start(0)

    def _reset(self, run: int, ranges: int) -> None:
        RangeCounts.__init__(self, run)
        self.first = FirstPositions()
        self.ranges = ranges  # of the read plan: sizes the table once (see `first_occurrences`)
        self.reported: set[int] = set()
        self.contiguous = 0  # ranges 0 .. contiguous-1 have all reported
        self.changed = asyncio.Condition()

    async def first_occurrences(
        self, range_index: int, hashes: np.ndarray, doc_index: np.ndarray, run: int = 0
    ):
        """Record the hashes of one range's documents (their indices within the range in
        `doc_index`); once ranges < range_index have reported, return, per document, whether it is
        its hash's first occurrence."""
        self.check_run(run, "hashes")
        hashes = np.ascontiguousarray(hashes, dtype=np.int64)
        positions = (np.int64(range_index) << _RANGE_SHIFT) + doc_index.astype(np.int64)
        if self.ranges and not self.reported:
            # The first report sizes the table for as many documents in every range (ranges are cut
            # to about the same bytes), so it rarely has to double, the costly step, on the way.
            self.first.reserve(len(hashes) * self.ranges)
        slots = self.first.record(hashes, positions)
        generation = self.first.generation
        changed = self.changed
        async with changed:
            self.reported.add(range_index)
            while self.contiguous in self.reported:
                self.contiguous += 1
            changed.notify_all()
            try:
                await asyncio.wait_for(
                    changed.wait_for(lambda: self.run != run or self.contiguous >= range_index), WAIT_S
                )
            except TimeoutError:
                raise DedupTimeoutError(
                    f"range {range_index} waited {WAIT_S:.0f} s for range {self.contiguous} to report "
                    "its document hashes (did its task fail?)"
                ) from None
        self.check_run(run, "hashes")
        if self.first.generation != generation:  # the table grew while this range waited
            slots = self.first.slots(hashes, claim=False)
        return self.first.table[slots, 1] == positions

    def memory(self) -> dict[str, int]:
        """Unique hashes held, the bytes of the table holding them, and this process's resident and
        peak resident memory (for the benchmark's report)."""
        import resource

        import psutil

        return {
            "entries": self.first.count,
            "table_bytes": self.first.nbytes,
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


class DedupIndex:
    """Handles on the partitions; pickled into every range task."""

    def __init__(self, partitions: int, ranges: int = 0) -> None:
        """`ranges`: of the read plan, if known (a sizing hint; it never changes an answer)."""
        self.run = next(_RUNS)
        session = _session()
        if _LIVE and len(_IDLE.get(session, [])) < partitions:
            # A dataset holds reference cycles, so an ended run's index waits for the cyclic
            # collector; one pass (milliseconds) costs less than starting a partition process.
            gc.collect()
        self.actors = _reuse(session, partitions, self.run, ranges)
        # SPREAD: on a multi-node cluster the partitions' memory lands on different nodes.
        self.actors += [
            DedupPartition.options(scheduling_strategy="SPREAD").remote(ranges, self.run)
            for _ in range(partitions - len(self.actors))
        ]
        weakref.finalize(self, _release, session, self.run, list(self.actors))
        _LIVE.add(self)

    def first_occurrences(self, range_index: int, hashes: np.ndarray, doc_index: np.ndarray) -> np.ndarray:
        """Whether each document (hash, index within range `range_index`) is its content's first
        occurrence in the corpus."""
        doc_index = doc_index.astype(np.uint32)  # 4 bytes a document on the wire
        # High bits choose the partition: a partition's table slots come from the low bits.
        part = (hashes.view(np.uint64) >> np.uint64(32)) % np.uint64(len(self.actors))
        refs, members = [], []
        for p, actor in enumerate(self.actors):
            idx = np.flatnonzero(part == p)
            members.append(idx)
            refs.append(actor.first_occurrences.remote(range_index, hashes[idx], doc_index[idx], self.run))
        try:
            answers = ray.get(refs)
        except ray.exceptions.RayActorError as err:
            raise DedupPartitionLostError(
                f"a dedup partition (one of data.dedup_partitions = {len(self.actors)}) died, most "
                "likely out of memory; the document hashes it held are lost, so this run stops rather "
                f"than keep duplicates. Each partition needs about {PEAK_ENTRY_BYTES} bytes per unique "
                "document of its share of the corpus: raise data.dedup_partitions (the blocks do not "
                "change) or give the nodes more memory, then run again."
            ) from err
        keep = np.zeros(len(hashes), dtype=bool)
        for idx, answer in zip(members, answers, strict=True):
            keep[idx] = answer
        return keep

    @property
    def ledger(self) -> ray.actor.ActorHandle:
        """The actor the range tasks report their counts to (see `DedupPartition`)."""
        return self.actors[0]

    def memory(self) -> list[dict[str, int]]:
        return ray.get([a.memory.remote() for a in self.actors])


def _session() -> str:
    """This driver's Ray session: actor handles of an earlier `ray.init` are not reused."""
    ctx = ray.get_runtime_context()
    return f"{ctx.get_node_id()}/{ctx.get_job_id()}"


def _reuse(session: str, partitions: int, run: int, ranges: int) -> list[ray.actor.ActorHandle]:
    """Up to `partitions` idle partitions of ended runs, started on run `run`."""
    idle, taken = _IDLE.get(session, []), []
    while idle and len(taken) < partitions:
        actor = idle.pop()
        try:
            ray.get(actor.start.remote(run, ranges))
        except ray.exceptions.RayActorError:
            continue  # died while idle (its node went away): start a new one instead
        taken.append(actor)
    return taken


def _release(session: str, run: int, actors: list[ray.actor.ActorHandle]) -> None:
    """Run `run`'s index was garbage-collected: empty its partitions and keep them for the next run."""
    try:
        if not ray.is_initialized() or _session() != session:
            return  # the session is gone; its actors went with it
        idle = _IDLE.setdefault(session, [])
        for actor in actors:
            if len(idle) < _MAX_IDLE:
                actor.end.remote(run)  # frees the table now, not when the next run starts
                idle.append(actor)
            else:
                ray.kill(actor)
    except Exception:  # noqa: BLE001 - a finaliser runs at any time, even while Ray shuts down
        pass
