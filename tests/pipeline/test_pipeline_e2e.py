"""`raylm pipeline` end to end at toy size, as a user runs it: every real stage, the Serve endpoint and
the `openai` smoke requests; then a rerun that skips every stage and is stopped by the gate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local_cluster import free_port

RAYLM = str(Path(sys.executable).with_name("raylm"))

TINY = """
cluster: {{run_name: e2e, storage_path: {storage}}}
data: {{demo: {{num_documents: 200, num_sft_pairs: 120}}, seq_len: 64, mode: materialize}}
tokenizer: {{vocab_size: 512}}
model: {{hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128, max_position_embeddings: 128}}
train: {{num_workers: 1, micro_batch_size: 8, max_steps: 20, warmup_steps: 2, eval_every: 10, log_every: 5,
        checkpoint_every: 20}}
finetune: {{num_workers: 1, micro_batch_size: 8, max_steps: 20, warmup_steps: 2, max_seq_len: 64,
           eval_every: 10, log_every: 5, checkpoint_every: 20}}
eval: {{max_examples: 8, max_new_tokens: 12, num_samples: 2}}
serve: {{port: {port}, num_cpus_per_replica: 0.5, max_batch_size: 4}}
"""


def raylm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("RAYLM_API_KEYS", None)
    return subprocess.run([RAYLM, *args], capture_output=True, text=True, env=env, timeout=1500)


@pytest.mark.slow
def test_pipeline_runs_to_the_endpoint_then_skips_and_gates(ray_cluster, tmp_path):
    from ray import serve

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(storage=tmp_path / "runs", port=free_port()))
    run_dir = tmp_path / "runs" / "e2e"
    try:
        first = raylm("pipeline", str(config))
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert first.stdout.count("Q:") >= 3 and "generated an API key" in first.stdout
        # The terminal shows raylm's lines only; the libraries' output is in the log file it names.
        terminal = first.stdout + first.stderr
        assert len(terminal.splitlines()) <= 60, terminal
        for noise in ("Warning", "pid=", "INFO", "WARNING", "Traceback"):
            assert noise not in terminal, noise
        log = Path(re.search(r"library output \(.*?\) → (\S+\.log)", terminal).group(1))
        assert log.parent == run_dir / "logs" and "RayTrainWorker" in log.read_text()
        for stage in ("pretrain", "finetune"):
            assert re.search(rf"✓ {stage} +done in \d+ s · 20 steps · loss [\d.]+ → [\d.]+", terminal), stage
        # This run joined the test cluster, so the endpoint outlives the command, and both places say so.
        assert "keeps running on the Ray cluster this command joined" in first.stdout

        report = (run_dir / "report.md").read_text()
        for needle in (
            "| pretrained |",
            "| finetuned |",
            "](pretrain/loss_curve.png)",
            "](finetune/loss_curve.png)",
            "OpenAI-compatible base URL",
            "keeps running on the Ray cluster this command joined",
            "documents:",
            "**Q:**",
        ):
            assert needle in report, needle
        key = (run_dir / "serve" / "api_key").read_text().strip()
        assert key not in report and key not in first.stderr
        assert (run_dir / "serve" / "api_key").stat().st_mode & 0o077 == 0
        results = json.loads((run_dir / "eval" / "results.json").read_text())["models"]
        assert set(results) == {"pretrained", "finetuned"}
        assert all(r["examples"] == 8 and r["perplexity"] > 1 for r in results.values())

        # Same config plus a gate no toy model passes: nothing is recomputed and nothing is deployed.
        serve.delete("raylm")
        second = raylm("pipeline", str(config), "--set", "eval.min_exact_match=1.0")
        assert second.returncode == 3, second.stdout[-3000:] + second.stderr[-3000:]
        assert second.stdout.count("up to date, skipped") == 6
        assert "not deploying" in second.stderr.replace("\n", " ")
        assert "raylm" not in serve.status().applications
    finally:
        serve.shutdown()  # the next tests (and their own HTTP port) start Serve afresh
