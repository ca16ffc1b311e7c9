"""The pipeline on a head plus two raylets: tokenisation runs on several nodes, blocks are unchanged."""

from __future__ import annotations

import signal
import time

import numpy as np
import ray
from ray.util.state import list_tasks

from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.pipeline import token_datasets
from data_pipelines.readers import list_inputs, plan_reads

RANGE_TASK = "MapBatches(pack_ranges)"


def _blocks(ds) -> np.ndarray:
    return np.concatenate([b["input_ids"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _range_task_nodes(since_ms: int, until_ms: int, expected: int) -> dict[str, str]:
    """task id -> node id of the finished range tasks created between the two times, from Ray's state
    API (task events reach the GCS asynchronously, so wait until all `expected` are there). The time
    window, not a snapshot of earlier tasks, leaves out a range task of an earlier test that finishes
    late (a dataset that failed midway), which a snapshot taken before this test would miss."""
    deadline = time.monotonic() + 120
    while True:
        tasks = list_tasks(
            filters=[("name", "=", RANGE_TASK), ("state", "=", "FINISHED")], limit=10_000, detail=True
        )
        found = {t.task_id: t.node_id for t in tasks if since_ms <= (t.creation_time_ms or 0) <= until_ms}
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_tokenisation_runs_on_several_nodes_and_blocks_equal_a_one_node_run(
    ray_cluster, shakespeare_parts, tmp_path
):
    cfg = DataConfig(paths=[str(shakespeare_parts)], seq_len=32, read_chunk_mb=6_000 / (1 << 20))
    tok = TokenizerConfig(vocab_size=300)
    run = str(tmp_path / "run")
    start = _now_ms()
    one_node = token_datasets(cfg, tok, run)
    assert len(_alive_nodes()) == 1, "the one-node reference run needs a cluster of just the head"
    reference = _blocks(one_node.train)
    end = _now_ms()
    ranges = len(plan_reads(list_inputs(cfg.paths), cfg))
    assert ranges >= 8
    first = _range_task_nodes(start, end, ranges)
    assert len(first) == ranges

    nodes = [ray_cluster.add_node(num_cpus=2, name=f"data{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(_alive_nodes()) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(_alive_nodes()) == 3
        start = _now_ms()
        spread = token_datasets(cfg, tok, run)
        blocks = _blocks(spread.train)
        placed = _range_task_nodes(start, _now_ms(), ranges)
        assert len(placed) == ranges
        assert len(set(placed.values())) > 1, f"every range task ran on one node: {placed}"
        assert np.array_equal(blocks, reference)
        assert spread.stats() == one_node.stats()
    finally:
        for node in nodes:
            ray_cluster.remove_node(node, sig=signal.SIGTERM)
