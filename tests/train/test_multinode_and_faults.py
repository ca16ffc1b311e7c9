"""Multi-node training on a real second raylet, and automatic resume after a worker is killed."""

from __future__ import annotations

import os
import signal
import threading
import time

from jobs.checkpointing import checkpoint_dirs, incompleteness, read_meta
from jobs.metrics import read_metrics
from jobs.pretrain import train
from jobs.train_loop import PIDS_DIR
from tests.train.conftest import SEQ_LEN, datasets, tiny_config


def test_two_nodes_strict_spread(ray_cluster, blocks, char_tokenizer, tmp_path):
    node = ray_cluster.add_node(num_cpus=2)
    try:
        cfg = tiny_config(tmp_path, "multinode", **{
            "train.placement_strategy": "STRICT_SPREAD", "train.max_steps": 4, "train.eval_every": 4,
            "train.checkpoint_every": 4,
            # DeepSpeed's own partitioning (every matrix gathered per module, across nodes): the path a
            # model too large to keep whole takes
            "train.zero3_param_persistence_threshold": 0,
        })
        train_ds, val_ds = datasets(blocks, train_rows=256)
        result = train(cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, export_model=False,
                       progress=False)
    finally:
        ray_cluster.remove_node(node)
    start = next(r for r in result.metrics if r["event"] == "start")
    assert len(start["node_ids"]) == 2 and start["node_ids"][0] != start["node_ids"][1]
    assert start["whole_params"] == 0
    assert read_meta(result.checkpoint)["step"] == 4


def test_killed_worker_resumes_from_checkpoint(ray_cluster, blocks, char_tokenizer, tmp_path):
    max_steps, every = 40, 5
    cfg = tiny_config(tmp_path, "faults", **{
        "train.max_steps": max_steps, "train.checkpoint_every": every, "train.eval_every": 20,
        "train.max_failures": 2, "train.num_to_keep": 3,
    })
    out_dir = tmp_path / "faults" / "pretrain"
    killed: dict[str, int] = {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            found = checkpoint_dirs(out_dir) if out_dir.exists() else []
            done = [c for c in found if incompleteness(c.path) is None]
            pid_file = out_dir / PIDS_DIR / "rank1.pid"
            if done and pid_file.exists():
                killed["pid"] = int(pid_file.read_text())
                killed["after_step"] = max(c.step for c in done)
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    train_ds, val_ds = datasets(blocks)
    result = train(cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, export_model=False, progress=False)
    killer.join(timeout=5)
    assert "pid" in killed, "no complete checkpoint appeared to kill a worker after"
    records = read_metrics(out_dir)
    starts = [r for r in records if r["event"] == "start"]
    assert len(starts) == 2, starts
    resumed = starts[1]
    assert resumed["step"] >= killed["after_step"] >= every and resumed["step"] % every == 0
    assert resumed["resumed_from"] and killed["pid"] not in resumed["pids"]
    # the first training record after the restart continues at the checkpoint, not at step 0
    after = [r["step"] for r in records[records.index(resumed):] if r["event"] == "train"]
    assert after[0] == resumed["step"] + 1 and after[-1] == max_steps
    meta = read_meta(result.checkpoint)
    assert meta["step"] == max_steps and meta["tokens_seen"] == max_steps * 2 * 8 * SEQ_LEN
