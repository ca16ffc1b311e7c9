"""Resume is exact: a run resumed from an earlier checkpoint retrains the same steps with the same
per-step losses as the uninterrupted run, with the shuffle on, across an epoch boundary, and on a
cluster with a different CPU count.

The uninterrupted reference is the first run itself: its last checkpoints lose their COMPLETE marker
(as a crash mid-save leaves them), so the resumed run restarts from an earlier one and must replay
the same steps. fp32 on CPU with one torch thread per worker, gloo's fixed reduction order and the
same world size run the same kernels on the same batches, so the losses are expected bit-identical;
the relative tolerance of 1e-6 only absorbs a change of summation order, far below the ~1e-2 a single
different batch makes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.local_cluster import LocalCluster
from jobs.checkpointing import COMPLETE_MARKER, checkpoint_dirs
from jobs.metrics import read_metrics
from jobs.pretrain import train
from tests.train.conftest import SEQ_LEN, datasets, tiny_config

RAYLM = str(Path(sys.executable).with_name("raylm"))
RTOL = 1e-6


def _losses_by_run(out_dir: Path) -> list[dict[int, float]]:
    """Per-step training losses of each start of the run, in order."""
    runs: list[dict[int, float]] = []
    for r in read_metrics(out_dir):
        if r["event"] == "start":
            runs.append({})
        elif r["event"] == "train":
            runs[-1][r["step"]] = r["loss"]
    return runs


def _unmark(out_dir: Path, steps: set[int]) -> None:
    for cand in checkpoint_dirs(out_dir):
        if cand.step in steps:
            (cand.path / COMPLETE_MARKER).unlink()


def _assert_same(first: dict[int, float], again: dict[int, float], steps: range) -> None:
    assert list(again) == list(steps), again
    for step in steps:
        assert abs(again[step] - first[step]) <= RTOL * abs(first[step]), (step, first[step], again[step])


def test_resume_replays_the_uninterrupted_losses_across_an_epoch(ray_cluster, blocks, char_tokenizer,
                                                                 tmp_path):
    # 112 rows over 2 workers x 8 per micro batch: 7 steps an epoch, so step 12 is in epoch 1 and the
    # replay from step 4 (epoch 0, 4 batches in) crosses into a reshuffled epoch.
    cfg = tiny_config(tmp_path, "exact", **{
        "train.zero_stage": 3, "train.max_steps": 12, "train.checkpoint_every": 4, "train.eval_every": 100,
        "train.num_to_keep": 3, "train.lr": 3e-3,
    })
    assert cfg.data.shuffle
    train_ds, val_ds = datasets(blocks, train_rows=112)
    result = train(cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, export_model=False, progress=False)
    out_dir = result.run_dir / "pretrain"
    _unmark(out_dir, {8, 12})
    train(cfg, train_ds, val_ds, str(char_tokenizer), SEQ_LEN, resume=True, export_model=False,
          progress=False)
    first, again = _losses_by_run(out_dir)
    starts = [r for r in read_metrics(out_dir) if r["event"] == "start"]
    assert starts[1]["data_position"] == {"epoch": 0, "micro_batches_in_epoch": 4}
    _assert_same(first, again, range(5, 13))


def _raylm(run_file: Path, address: str, *args: str) -> None:
    env = {**os.environ, "RAY_ADDRESS": address}
    done = subprocess.run([RAYLM, "train", str(run_file), *args], capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_resume_on_a_cluster_with_another_cpu_count(ray_cluster, shakespeare, tmp_path):
    """Through the real streamed data pipeline and the CLI: train on a 3-CPU cluster, resume on the
    8-CPU session cluster; the corpus is read in four 50 kB ranges, so the two runs execute a different
    number of range tasks at once (capped by the CPUs) and blocks reach the split in a different
    rhythm; the read plan itself depends on the corpus alone. The replayed steps match."""
    corpus = tmp_path / "shakespeare-200k.txt"
    corpus.write_text(Path(shakespeare).read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "cluster": {"run_name": "cpus", "storage_path": str(tmp_path / "runs")},
        "data": {"paths": [str(corpus)], "seq_len": SEQ_LEN, "val_fraction": 0.05, "read_chunk_mb": 0.05},
        "tokenizer": {"kind": "char", "vocab_size": 128, "min_frequency": 1},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                  "max_position_embeddings": SEQ_LEN},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1, "micro_batch_size": 8,
                  "max_steps": 8, "checkpoint_every": 4, "eval_every": 100, "eval_batches": 2, "log_every": 1,
                  "warmup_steps": 2, "num_to_keep": 3, "lr": 3e-3},
    }))
    small = LocalCluster.start(num_cpus=3, dashboard=False)
    try:
        _raylm(run_file, small.address)
    finally:
        small.down()
    out_dir = tmp_path / "runs" / "cpus" / "pretrain"
    _unmark(out_dir, {8})
    _raylm(run_file, ray_cluster.address, "--resume")
    first, again = _losses_by_run(out_dir)
    _assert_same(first, again, range(5, 9))
