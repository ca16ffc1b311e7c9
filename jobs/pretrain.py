"""Pretraining job: tokenised blocks from the data pipeline → Ray Train workers with DeepSpeed → HF export.

`raylm train run.yaml [--set train.max_steps=50] [--resume]` (or `python -m cluster.run_stage pretrain
--config run.yaml`) runs the same way locally (embedded Ray) and on a cluster (joins RAY_ADDRESS).
Artefacts land in `<run>/pretrain/` (checkpoints, metrics.jsonl, TensorBoard events, loss_curve.png)
and the consolidated model in `<run>/export/pretrained`, which fine-tuning, evaluation and serving pick up.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from data_pipelines.layout import RunLayout, Stage
from data_pipelines.tokenizer import load_tokenizer
from jobs.config import RunSections
from jobs.export import export
from jobs.metrics import log_event, plot_loss_curve, read_metrics, summary_table
from jobs.model import build_model, hf_config
from jobs.train_loop import LoopSpec, check_fresh, final_checkpoint, fit

log = logging.getLogger(__name__)
console = Console()
STAGE = Stage.PRETRAIN


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    export_dir: Path | None
    metrics: list[dict[str, Any]]
    loss_curve: Path | None


def local_run_dir(cfg: RunSections) -> Path:
    """Where this process writes the run's files: the run folder, or for a run folder on object
    storage (checkpoints go there through Ray Train) a local folder named after its URI."""
    run_dir = cfg.run_dir()
    if "://" in run_dir:
        return Path(tempfile.gettempdir(), "raylm-runs", run_dir.replace("://", "/", 1))
    return Path(run_dir).resolve()


def loop_spec(cfg: RunSections, tokenizer_dir: str, seq_len: int) -> LoopSpec:
    """The pretraining LoopSpec: causal-LM loss on packed `input_ids` blocks."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = hf_config(cfg.model, tokenizer, seq_len)
    return LoopSpec(
        stage=STAGE,
        run_dir=str(local_run_dir(cfg)),
        storage_path=cfg.run_dir() if "://" in cfg.run_dir() else None,
        train=cfg.train,
        build_model=functools.partial(build_model, config, cfg.model.init_from),
        seq_len=seq_len,
        tokenizer_dir=str(tokenizer_dir),
        config_hash=cfg.section_hash("data", "tokenizer", "model"),
        shuffle=cfg.data.shuffle,
        # Parquet shards are on disk in full: a block permutation costs no waiting. Streamed blocks only
        # get the workers' local shuffle (a permutation would wait for the whole corpus to stream).
        shuffle_blocks=cfg.data.mode == "materialize",
    )


def train(
    cfg: RunSections,
    train_ds: Any,
    val_ds: Any | None,
    tokenizer_dir: str,
    seq_len: int,
    resume: bool = False,
    export_model: bool = True,
    progress: bool = True,
) -> PretrainResult:
    """Train on given Ray Datasets of `{"input_ids": int32[seq_len]}`; plot, summarise, export."""
    spec = loop_spec(cfg, tokenizer_dir, seq_len)
    datasets = {"train": train_ds} | ({"val": val_ds} if val_ds is not None else {})
    if val_ds is None:
        spec.val_dataset = None
    fit(spec, datasets, resume=resume, progress=progress)
    checkpoint = final_checkpoint(spec)
    out = None
    if export_model:
        out = export(checkpoint, RunLayout(Path(spec.run_dir)).pretrained)
        log_event(spec.out_dir, "exported", path=str(out))  # the summary's "last step → export" row
        console.print(f"exported Hugging Face model to [bold]{out}[/]")
    records = read_metrics(spec.out_dir)
    curve = plot_loss_curve(records, spec.out_dir / "loss_curve.png") if records else None
    console.print(summary_table(records, f"pretrain · {cfg.run_name}"))
    return PretrainResult(Path(spec.run_dir), checkpoint, out, records, curve)


def run(cfg: RunSections, resume: bool = False) -> PretrainResult:
    """The whole stage on a started Ray: stream the corpus through the data pipeline, train, export."""
    from data_pipelines.pipeline import token_datasets

    check_fresh(RunLayout(local_run_dir(cfg)).stage_dir(STAGE), resume)
    td = token_datasets(cfg.data, cfg.tokenizer, cfg.run_dir())
    return train(cfg, td.train, td.val, td.tokenizer_dir, td.seq_len, resume=resume)
