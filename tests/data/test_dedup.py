"""The dedup partitions on their own: first occurrence by corpus position, whatever order ranges
report in, and the same answer when a range reports again (a retried task, the next epoch)."""

from __future__ import annotations

import numpy as np
import ray

from data_pipelines.dedup import DedupIndex, DedupPartition


def test_a_later_range_waits_for_earlier_ones_and_loses_to_them(ray_cluster):
    actor = DedupPartition.remote()
    # Range 1 reports first: hash 7 twice (positions 0 and 2 within the range) and hash 9 once.
    later = actor.first_occurrences.remote(
        1, np.array([7, 9, 7]), np.array([(1 << 32) + i for i in range(3)])
    )
    ready, _ = ray.wait([later], timeout=2.0)
    assert not ready, "range 1 must not be answered before range 0 has reported"
    earlier = actor.first_occurrences.remote(0, np.array([9, 5]), np.array([0, 1]))
    assert ray.get(earlier).tolist() == [True, True]
    assert ray.get(later).tolist() == [True, False, False]  # 9 was seen in range 0; the second 7 too
    again = actor.first_occurrences.remote(
        1, np.array([7, 9, 7]), np.array([(1 << 32) + i for i in range(3)])
    )
    assert ray.get(again).tolist() == [True, False, False]
    assert ray.get(actor.memory.remote())["entries"] == 3


def test_index_splits_hashes_over_partitions_and_keeps_first_occurrences(ray_cluster):
    index = DedupIndex(3)
    rng = np.random.default_rng(0)
    hashes = rng.integers(-(1 << 63), (1 << 63) - 1, 300, dtype=np.int64)
    first_range = np.concatenate([hashes[:200], hashes[:10]])  # 10 repeats within the range
    keep0 = index.first_occurrences(0, first_range, np.arange(len(first_range)))
    keep1 = index.first_occurrences(1, hashes[150:], np.arange(150))  # 50 repeats of range 0
    assert keep0.tolist() == [True] * 200 + [False] * 10
    assert keep1.tolist() == [False] * 50 + [True] * 100
    held = [m["entries"] for m in index.memory()]
    assert sum(held) == 300 and all(held)  # every partition holds a share, none holds all
