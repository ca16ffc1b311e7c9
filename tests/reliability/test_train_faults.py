"""Training under faults: a whole worker node (raylet) killed mid-run, and partial checkpoints left by
a crash mid-save. The worker-process kill lives in tests/train; this is the node-level failure."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from jobs.checkpointing import COMPLETE_MARKER, META_FILE, newest_complete, read_meta
from jobs.metrics import read_metrics
from jobs.pretrain import loop_spec, train
from jobs.train_loop import final_checkpoint
from tests.train.conftest import SEQ_LEN, blocks, char_tokenizer, datasets, tiny_config  # noqa: F401

MICRO, WORKERS = 8, 2
TOKENS_PER_STEP = MICRO * WORKERS * SEQ_LEN


def _victim_node_id() -> str:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("victim")]
    return node["NodeID"]


def _kill_after_checkpoint(
    out_dir: Path, node: dict, victim: str, state: dict, stop: threading.Event
) -> None:
    """Wait for a complete checkpoint and two more logged steps, then kill every process of the node."""
    while not stop.is_set():
        ckpt = newest_complete(out_dir) if out_dir.exists() else None
        records = read_metrics(out_dir) if ckpt else []
        starts = [r for r in records if r["event"] == "start"]
        steps = [r["step"] for r in records if r["event"] == "train"]
        if ckpt and starts and steps and max(steps) >= read_meta(ckpt)["step"] + 2:
            pids = list(node["pids"])
            pids += [p for p, n in zip(starts[0]["pids"], starts[0]["node_ids"], strict=True) if n == victim]
            state.update(checkpoint_step=read_meta(ckpt)["step"], killed_at=max(steps), pids=pids)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def node_kill_run(ray_cluster, blocks, char_tokenizer, tmp_path_factory):  # noqa: F811
    node = ray_cluster.add_node(num_cpus=2, resources={"victim": 1}, name="victim")
    victim = _victim_node_id()
    cfg = tiny_config(
        tmp_path_factory.mktemp("rel-runs"),
        "raylet-kill",
        **{
            "train.max_steps": 16,
            "train.checkpoint_every": 8,
            "train.eval_every": 100,
            "train.max_failures": 2,
            "train.placement_strategy": "SPREAD",
            "train.zero_stage": 3,
            "train.micro_batch_size": MICRO,
        },
    )
    out_dir = loop_spec(cfg, str(char_tokenizer), SEQ_LEN).out_dir
    state: dict = {}
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_after_checkpoint, args=(out_dir, node, victim, state, stop), daemon=True
    )
    killer.start()
    train_ds, val_ds = datasets(blocks)
    try:
        result = train(
            cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, export_model=False, progress=False
        )
    finally:
        stop.set()
        killer.join(timeout=10)
        ray_cluster.remove_node(node)
    return cfg, result, victim, state, out_dir


def test_raylet_kill_resumes_from_last_complete_checkpoint(node_kill_run):
    _, result, victim, state, _ = node_kill_run
    assert state, "the node was never killed (no complete checkpoint seen)"
    starts = [r for r in result.metrics if r["event"] == "start"]
    assert victim in starts[0]["node_ids"] and len(set(starts[0]["node_ids"])) == 2, starts[0]
    assert starts[0]["step"] == 0 and len(starts) >= 2, starts
    restart = starts[-1]
    assert victim not in restart["node_ids"]
    # Resumed exactly at the checkpoint that was complete when the node died, not at step 0.
    assert restart["step"] == state["checkpoint_step"] == 8, (restart, state)
    assert restart["resumed_from"] and restart["data_position"]["micro_batches_in_epoch"] > 0
    after = [r["step"] for r in result.metrics if r["event"] == "train" and r["time"] >= restart["time"]]
    assert after == list(range(9, 17)), after  # no step lost beyond the checkpoint, none repeated twice
    meta = read_meta(result.checkpoint)
    assert meta["step"] == 16 and meta["tokens_seen"] == 16 * TOKENS_PER_STEP  # data position restored


def _fake_partial(src: Path, name: str, step: int, how: str) -> Path:
    """A checkpoint folder as a crash leaves it: copied shards, a newer step, and one defect."""
    dst = src.parent / name
    shutil.copytree(src, dst)
    meta = json.loads((dst / META_FILE).read_text())
    meta.update(step=step, tag=f"global_step{step}")
    (dst / META_FILE).write_text(json.dumps(meta))
    if how == "no-marker":
        (dst / COMPLETE_MARKER).unlink()
    else:
        shard = next(p for p in sorted(dst.rglob("*.pt")))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return dst


def test_partial_checkpoints_are_skipped_on_resume(node_kill_run, blocks, char_tokenizer):  # noqa: F811
    cfg, first, _, _, out_dir = node_kill_run
    partial = _fake_partial(first.checkpoint, "checkpoint_9999-12-31_23-59-58.000000", 24, "no-marker")
    torn = _fake_partial(first.checkpoint, "checkpoint_9999-12-31_23-59-59.000000", 28, "truncated-shard")
    before = {p: p.stat().st_mtime_ns for p in first.checkpoint.rglob("*") if p.is_file()}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 20})})
    train_ds, val_ds = datasets(blocks)
    result = train(
        cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, resume=True, export_model=False, progress=False
    )
    starts = [r for r in result.metrics if r["event"] == "start"]
    assert starts[-1]["step"] == 16 and starts[-1]["resumed_from"], starts[-1]
    skipped = {r["path"]: r["reason"] for r in result.metrics if r["event"] == "checkpoint_skipped"}
    assert "COMPLETE marker" in skipped[str(partial)], skipped
    assert "bytes, expected" in skipped[str(torn)], skipped
    assert read_meta(result.checkpoint)["step"] == 20
    assert final_checkpoint(loop_spec(cfg, str(char_tokenizer), SEQ_LEN)) == result.checkpoint
    assert {
        p: p.stat().st_mtime_ns for p in first.checkpoint.rglob("*") if p.is_file()
    } == before or not first.checkpoint.exists()  # num_to_keep may prune it; it is never rewritten
