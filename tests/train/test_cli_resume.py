"""`raylm train` end to end through the real data pipeline, refusal to overwrite, and `--resume`
past a corrupted newest checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from jobs.checkpointing import checkpoint_dirs, read_meta
from jobs.metrics import read_metrics
from tests.train.conftest import SEQ_LEN

RAYLM = str(Path(sys.executable).with_name("raylm"))


def _raylm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAYLM, *args], capture_output=True, text=True, timeout=900)


def test_cli_train_refuse_then_resume_past_corrupted_checkpoint(ray_cluster, shakespeare, tmp_path):
    corpus = tmp_path / "shakespeare-100k.txt"  # a slice keeps the streamed pipeline quick
    corpus.write_text(Path(shakespeare).read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "cluster": {"run_name": "cli", "storage_path": str(tmp_path / "runs")},
        "data": {"paths": [str(corpus)], "seq_len": SEQ_LEN, "val_fraction": 0.05},
        "tokenizer": {"kind": "char", "vocab_size": 128, "min_frequency": 1},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                  "max_position_embeddings": SEQ_LEN},
        "train": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1, "micro_batch_size": 8,
                  "max_steps": 4, "checkpoint_every": 2, "eval_every": 2, "eval_batches": 2, "log_every": 1,
                  "warmup_steps": 1, "num_to_keep": 3},
    }))
    first = _raylm("train", str(run_file))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stage = tmp_path / "runs" / "cli" / "pretrain"
    assert (tmp_path / "runs" / "cli" / "export" / "pretrained" / "config.json").is_file()

    refused = _raylm("train", str(run_file))
    assert refused.returncode == 2 and "--resume" in refused.stderr

    newest = checkpoint_dirs(stage)[0]
    assert newest.step == 4
    next(newest.path.glob("global_step4/*rank_1*model_states.pt")).unlink()  # a shard lost mid-upload

    resumed = _raylm("train", str(run_file), "--set", "train.max_steps=6", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = read_metrics(stage)
    skipped = [r for r in records if r["event"] == "checkpoint_skipped"]
    assert skipped and "missing shard file global_step4/" in skipped[0]["reason"]
    starts = [r for r in records if r["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 2]
    assert [r["step"] for r in records if r["event"] == "train"][-3:] == [4, 5, 6]
    assert read_meta(checkpoint_dirs(stage)[0].path)["step"] == 6
