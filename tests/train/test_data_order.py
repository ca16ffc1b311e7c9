"""The training data order: uniform blocks make each worker's rows independent of the upstream block
layout (read ranges, files, CPUs), and the seeded local shuffle gives a new order per epoch, the same
order for the same epoch."""

from __future__ import annotations

import threading

import numpy as np

from jobs.train_loop import LoopSpec, shard_batches, shuffle_seed, training_order
from tests.train.conftest import tiny_config

ROWS, WORKERS, BATCH = 600, 2, 8


def _per_worker(ds, epoch: int | None) -> list[list[int]]:
    """Row ids each of two workers reads in one epoch, through the same calls the training loop makes."""
    shards = ds.streaming_split(WORKERS, equal=True)
    out: list[list[int]] = [[] for _ in range(WORKERS)]

    def read(rank: int) -> None:  # the workers of a split consume together, as Ray Train's do
        seed = None if epoch is None else shuffle_seed(0, epoch, rank)
        for batch in shard_batches(shards[rank], BATCH, drop_last=True, seed=seed, buffer_rows=256):
            out[rank] += batch["row"].tolist()

    threads = [threading.Thread(target=read, args=(r,)) for r in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_worker_rows_independent_of_block_layout_and_reshuffled_per_epoch(ray_cluster, tmp_path):
    import ray.data

    # What fit() asks of Ray Train (a dataset keeps the context it was created under).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    spec = LoopSpec(stage="order", run_dir=str(tmp_path), train=tiny_config(tmp_path, "o").train,
                    build_model=dict, seq_len=8)
    items = [{"row": np.int64(i)} for i in range(ROWS)]

    def dataset(blocks: int):  # the same rows cut into a different number of blocks, as another plan would
        return ray.data.from_items(items, override_num_blocks=blocks)

    # Without re-cutting, the split follows the block layout: the failure this guards against.
    assert _per_worker(dataset(3), None) != _per_worker(dataset(13), None)
    plain = _per_worker(training_order(dataset(3), spec), None)
    assert plain == _per_worker(training_order(dataset(13), spec), None)
    # shuffle off: whole blocks of corpus order, dealt to the workers in turn (the equal split evens the tail)
    assert [plain[0][:64], plain[1][:64]] == [list(range(64)), list(range(64, 128))]

    epoch0 = _per_worker(training_order(dataset(3), spec), 0)
    assert epoch0 == _per_worker(training_order(dataset(13), spec), 0)  # same seed + epoch: same batches
    epoch1 = _per_worker(training_order(dataset(3), spec), 1)
    for rank in range(WORKERS):
        for shuffled in (epoch0[rank], epoch1[rank]):  # the same rows per worker (but the dropped tail)...
            assert len(shuffled) == len(plain[rank]) and len(set(shuffled) - set(plain[rank])) < BATCH
        assert epoch0[rank] != plain[rank] and epoch0[rank] != epoch1[rank]  # ...in a new order per epoch
