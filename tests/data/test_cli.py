"""`raylm data prepare` and `python -m cluster.run_stage tokens` as users run them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def _raylm(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("raylm")), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)


def _run_file(tmp_path: Path) -> Path:
    cfg = {
        "cluster": {"storage_path": str(tmp_path / "runs"), "run_name": "cli"},
        "data": {"demo": {"num_documents": 60, "num_sft_pairs": 20}, "seq_len": 32},
        "tokenizer": {"vocab_size": 300},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_data_prepare_on_the_demo_corpus(ray_cluster, tmp_path):
    run_file = _run_file(tmp_path)
    done = _raylm("data", "prepare", str(run_file), "--set", "data.val_fraction=0.2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "documents read" in done.stdout and "dropped tail tokens" in done.stdout
    run = tmp_path / "runs" / "cli"
    manifest = json.loads((run / "data" / "shards" / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["stats"]["documents_read"] == 60
    assert manifest["splits"]["train"]["blocks"] > 0 and manifest["splits"]["val"]["blocks"] > 0
    assert (run / "data" / "demo" / "sft_eval.jsonl").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()

    again = _raylm("data", "prepare", str(run_file), "--set", "data.val_fraction=0.2")
    assert again.returncode == 0 and "reused" in again.stdout
    assert json.loads((run / "data" / "shards" / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.bogus_key=1", "data.bogus_key"),
        ("data.seq_len=long", "data.seq_len"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("tokenizer.kind=wordpiece", "tokenizer.kind"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path, override, named):
    done = _raylm("data", "prepare", str(_run_file(tmp_path)), "--set", override)
    assert done.returncode == 2
    assert named in done.stderr and "Traceback" not in done.stderr + done.stdout


def test_module_entrypoint_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  min_chars: 0\n")
    cmd = [sys.executable, "-m", "cluster.run_stage", "tokens", "--config", str(bad)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2 and "data.min_chars" in done.stderr and "Traceback" not in done.stderr
