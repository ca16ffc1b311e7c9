"""The dedup partitions on their own: first occurrence by corpus position, whatever order ranges
report in, the same answer when a range reports again (a retried task, the next epoch), and a clear
error when a partition is lost."""

from __future__ import annotations

import gc
import time
import traceback

import numpy as np
import pytest
import ray

from data_pipelines.dedup import DedupIndex, DedupPartition, DedupPartitionLostError, FirstPositions
from data_pipelines.pipeline import token_datasets
from data_pipelines.stats import StaleRunError


def test_a_later_range_waits_for_earlier_ones_and_loses_to_them(ray_cluster):
    actor = DedupPartition.remote()
    # Range 1 reports first: hash 7 twice (documents 0 and 2 of the range) and hash 9 once.
    later = actor.first_occurrences.remote(1, np.array([7, 9, 7]), np.arange(3))
    ready, _ = ray.wait([later], timeout=2.0)
    assert not ready, "range 1 must not be answered before range 0 has reported"
    earlier = actor.first_occurrences.remote(0, np.array([9, 5]), np.array([0, 1]))
    assert ray.get(earlier).tolist() == [True, True]
    assert ray.get(later).tolist() == [True, False, False]  # 9 was seen in range 0; the second 7 too
    again = actor.first_occurrences.remote(1, np.array([7, 9, 7]), np.arange(3))
    assert ray.get(again).tolist() == [True, False, False]
    assert ray.get(actor.memory.remote())["entries"] == 3


def test_table_keeps_the_smallest_position_per_hash_through_collisions_and_growth():
    """Against a dict: a tiny table (many hashes per home slot, several doublings), hashes sharing
    their low bits, repeats within and across calls, calls out of order."""
    rng = np.random.default_rng(1)
    pool = rng.integers(-(1 << 63), (1 << 63) - 1, 3000, dtype=np.int64)
    pool[:200] = (pool[:200] >> 16) << 16  # 200 hashes with the same low 16 bits
    calls = [(rng.choice(pool, 500), rng.permutation(10_000)[:500] + i * 10_000) for i in range(12)]
    table, expected = FirstPositions(capacity=8), {}
    for i in rng.permutation(len(calls)):
        hashes, positions = calls[i]
        table.record(hashes, positions)
        for h, p in zip(hashes.tolist(), positions.tolist(), strict=True):
            expected[h] = min(p, expected.get(h, p))
    assert table.generation >= 3 and table.count == len(expected)
    everything = np.array(list(expected), dtype=np.int64)
    stored = table.table[table.slots(everything, claim=False), 1]
    assert stored.tolist() == list(expected.values())
    with pytest.raises(KeyError):
        table.slots(np.array([12345], dtype=np.int64), claim=False)


def test_index_splits_hashes_over_partitions_and_keeps_first_occurrences(ray_cluster):
    index = DedupIndex(3, ranges=2)
    rng = np.random.default_rng(0)
    hashes = rng.integers(-(1 << 63), (1 << 63) - 1, 300, dtype=np.int64)
    first_range = np.concatenate([hashes[:200], hashes[:10]])  # 10 repeats within the range
    keep0 = index.first_occurrences(0, first_range, np.arange(len(first_range)))
    keep1 = index.first_occurrences(1, hashes[150:], np.arange(150))  # 50 repeats of range 0
    assert keep0.tolist() == [True] * 200 + [False] * 10
    assert keep1.tolist() == [False] * 50 + [True] * 100
    held = [m["entries"] for m in index.memory()]
    assert sum(held) == 300 and all(held)  # every partition holds a share, none holds all


def test_the_next_run_reuses_an_ended_runs_partitions_emptied_and_refuses_its_stale_calls(ray_cluster):
    """A partition process is kept for the next run once its index is collected: the next run
    starts from an empty table (a hash of the run before is new again), and a late call of the
    ended run (an abandoned task still going) is refused instead of touching the new run."""
    hashes = np.random.default_rng(3).integers(-(1 << 63), (1 << 63) - 1, 20, dtype=np.int64)
    first = DedupIndex(1, ranges=2)
    assert first.first_occurrences(0, hashes, np.arange(20)).all()
    actor, ended = first.actors[0], first.run
    del first
    gc.collect()
    second = DedupIndex(1, ranges=2)
    assert second.actors[0]._actor_id == actor._actor_id  # the same process, not a new one
    assert second.first_occurrences(0, hashes, np.arange(20)).all()  # run 1's hashes are gone
    assert second.first_occurrences(1, hashes[:5], np.arange(5)).tolist() == [False] * 5
    with pytest.raises(StaleRunError):
        ray.get(actor.first_occurrences.remote(1, hashes, np.arange(20), ended))
    with pytest.raises(StaleRunError):
        ray.get(actor.add.remote("train", 1, {"documents_read": 9}, ended))
    assert ray.get(second.ledger.stats.remote()) == {}


def test_an_ended_runs_late_end_leaves_the_next_run_its_partition(ray_cluster):
    """An async actor does not keep call order: the `end` an ended run's finaliser sends may execute
    after the next run's `start`, sent later. It must not empty the partition under the next run (CI
    once failed with "hashes of run 10 sent to a dedup partition now serving run 0")."""
    hashes = np.random.default_rng(4).integers(-(1 << 63), (1 << 63) - 1, 20, dtype=np.int64)
    actor = DedupPartition.remote(2, 5)
    ray.get(actor.first_occurrences.remote(0, hashes, np.arange(20), 5))
    ray.get(actor.start.remote(6, 2))  # the next run took the partition ...
    ray.get(actor.end.remote(5))  # ... before run 5's end executed
    assert ray.get(actor.first_occurrences.remote(0, hashes, np.arange(20), 6)).all()
    assert ray.get(actor.memory.remote())["entries"] == 20  # run 6's hashes are still there
    ray.get(actor.end.remote(6))  # its own end empties it
    assert ray.get(actor.memory.remote())["entries"] == 0
    with pytest.raises(StaleRunError):
        ray.get(actor.first_occurrences.remote(1, hashes, np.arange(20), 6))


def _kill(actor: ray.actor.ActorHandle) -> None:
    """Kill a partition and wait until it is dead: `ray.kill` only asks the GCS, and a call sent to a
    partition that is up already (one reused from an earlier run) can still be answered meanwhile."""
    ray.kill(actor)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.memory.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed partition still answers")


def test_a_lost_partition_fails_the_range_with_what_to_change(ray_cluster):
    index = DedupIndex(2)
    _kill(index.actors[1])
    with pytest.raises(DedupPartitionLostError, match=r"data\.dedup_partitions = 2.*memory"):
        hashes = np.random.default_rng(2).integers(-(1 << 63), (1 << 63) - 1, 50, dtype=np.int64)
        index.first_occurrences(0, hashes, np.arange(50))


def test_a_run_whose_partition_died_stops_with_that_error(
    ray_cluster, broken_corpus, small_cfg, char_tok, tmp_path
):
    """Through Ray Data: the range tasks' error reaches the caller with its advice, and no blocks
    computed without the lost hashes come out as if nothing happened."""
    cfg = small_cfg.model_copy(update={"paths": [str(broken_corpus)], "dedup_partitions": 2})
    td = token_datasets(cfg, char_tok, str(tmp_path / "run"))
    _kill(td.dedup.actors[0])
    with pytest.raises(Exception) as failure:  # noqa: PT011 - Ray Data wraps the task's error
        td.train.materialize()
    text = "".join(traceback.format_exception(failure.value))
    assert "DedupPartitionLostError" in text and "data.dedup_partitions = 2" in text
