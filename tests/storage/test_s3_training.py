"""A training run whose `cluster.storage_path` is on a real S3-compatible server: the corpus comes from
a bucket, checkpoints go to one through Ray Train, and `--resume` continues from them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.config import load_config
from cluster.storage import find_run
from data_pipelines.config import TokenizerConfig
from data_pipelines.tokenizer import train_tokenizer
from jobs.metrics import read_metrics
from jobs.pretrain import local_run_dir

SEQ_LEN = 64


def _pretrain(run_file: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.run_stage", "pretrain", "--config", str(run_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_training_checkpoints_to_s3_and_resumes_from_them(ray_cluster, s3, shakespeare, tmp_path):
    bucket = s3.bucket()
    text = Path(shakespeare).read_text(encoding="utf-8")[:60_000]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "part.txt").write_text(text, encoding="utf-8")
    corpus = s3.upload(tmp_path / "corpus", bucket, "corpus")
    tok = TokenizerConfig(kind="char", vocab_size=128, min_frequency=1)
    tokenizer = train_tokenizer(
        [text[i : i + 4000] for i in range(0, len(text), 4000)], tok, tmp_path / "tok"
    )
    storage = f"s3://{bucket}/runs"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        yaml.safe_dump(
            {
                "cluster": {"run_name": "s3run", "storage_path": storage},
                "data": {"paths": [f"{corpus}/"], "seq_len": SEQ_LEN, "val_fraction": 0.05},
                "tokenizer": {**tok.model_dump(), "path": str(tokenizer)},
                "model": {
                    "hidden_size": 64,
                    "num_layers": 2,
                    "num_heads": 4,
                    "intermediate_size": 128,
                    "max_position_embeddings": SEQ_LEN,
                },
                "train": {
                    "num_workers": 2,
                    "cpus_per_worker": 1,
                    "torch_threads": 1,
                    "micro_batch_size": 8,
                    "max_steps": 4,
                    "checkpoint_every": 2,
                    "eval_every": 2,
                    "eval_batches": 2,
                    "log_every": 1,
                    "warmup_steps": 1,
                },
            }
        )
    )
    local = local_run_dir(load_config(run_file, []))
    try:
        first = _pretrain(run_file)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        run = find_run(storage, "s3run")
        assert [c.step for c in run.checkpoints()] == [4, 2]
        assert all(c.uri.startswith(f"{storage}/s3run/pretrain/checkpoint_") for c in run.checkpoints())

        resumed = _pretrain(run_file, "--resume", "--set", "train.max_steps=6")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert run.latest_checkpoint().step == 6
        records = read_metrics(local / "pretrain")
        starts = [r for r in records if r["event"] == "start"]
        assert [s["step"] for s in starts] == [0, 4]
        assert starts[1]["resumed_from"] is not None
        assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
        assert (local / "export" / "pretrained" / "config.json").is_file()
    finally:
        shutil.rmtree(local, ignore_errors=True)
