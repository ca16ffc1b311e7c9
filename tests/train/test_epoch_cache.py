"""A small training split is executed once and read from the object store every epoch: the same rows in
the same per-worker order as the streamed split (exact resume depends on it), with no second run of
the upstream pipeline; a split over the budget stays lazy."""

from __future__ import annotations

import numpy as np

from jobs.train_loop import LoopSpec, cache_if_small, training_order
from tests.train.conftest import tiny_config
from tests.train.test_data_order import ROWS, _per_worker


def test_small_split_is_cached_in_order_and_not_re_executed(ray_cluster, tmp_path):
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as fit() asks
    spec = LoopSpec(stage="cache", run_dir=str(tmp_path), train=tiny_config(tmp_path, "c").train,
                    build_model=dict, seq_len=8)
    marks = tmp_path / "executions"
    marks.mkdir()

    def pipeline():  # an upstream stage that leaves a file per batch it processes
        def mark(batch):
            (marks / f"{np.random.default_rng().integers(1 << 62)}").touch()
            return batch

        items = [{"row": np.int64(i)} for i in range(ROWS)]
        return ray.data.from_items(items, override_num_blocks=5).map_batches(mark)

    streamed = {epoch: _per_worker(training_order(pipeline(), spec), epoch) for epoch in (0, 1)}
    cached = cache_if_small(training_order(pipeline(), spec), max_bytes=1 << 20)
    assert type(cached).__name__ == "MaterializedDataset"
    executed = len(list(marks.iterdir()))
    assert executed > 0
    for epoch in (0, 1, 0):
        assert _per_worker(cached, epoch) == streamed[epoch]
    assert len(list(marks.iterdir())) == executed  # epochs read the object store, not the pipeline

    too_big = cache_if_small(training_order(pipeline(), spec), max_bytes=100)
    assert type(too_big).__name__ == "Dataset"
    assert _per_worker(too_big, 0) == streamed[0]
