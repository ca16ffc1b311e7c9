"""Pretraining job: tokenised blocks from the data pipeline → Ray Train workers with DeepSpeed → HF export.

`python -m jobs.pretrain --config run.yaml [--set train.max_steps=50] [--resume]` runs the same way
locally (embedded Ray) and on a cluster (joins RAY_ADDRESS). Artefacts land in `<run>/pretrain/`
(checkpoints, metrics.jsonl, TensorBoard events, loss_curve.png) and the consolidated model in
`<run>/export/pretrained`, which fine-tuning, evaluation and serving pick up.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster.config import ConfigError, RunConfig, load_config
from data_pipelines.tokenizer import load_tokenizer
from jobs.export import export
from jobs.metrics import plot_loss_curve, read_metrics, summary_table
from jobs.model import build_model, hf_config
from jobs.train_loop import LoopSpec, RunExistsError, check_fresh, final_checkpoint, fit

log = logging.getLogger(__name__)
console = Console()
STAGE = "pretrain"


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    export_dir: Path | None
    metrics: list[dict[str, Any]]
    loss_curve: Path | None


def local_run_dir(cfg: RunConfig) -> Path:
    """Where this process writes the run's files: the run folder, or for a run folder on object
    storage (checkpoints go there through Ray Train) a local folder named after its URI."""
    run_dir = cfg.run_dir()
    if "://" in run_dir:
        return Path(tempfile.gettempdir(), "raylm-runs", run_dir.replace("://", "/", 1))
    return Path(run_dir).resolve()


def loop_spec(cfg: RunConfig, tokenizer_dir: str, seq_len: int) -> LoopSpec:
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
    cfg: RunConfig,
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
    records = read_metrics(spec.out_dir)
    curve = plot_loss_curve(records, spec.out_dir / "loss_curve.png") if records else None
    console.print(summary_table(records, f"pretrain · {cfg.cluster.run_name}"))
    checkpoint = final_checkpoint(spec)
    out = None
    if export_model:
        out = export(checkpoint, Path(spec.run_dir) / "export" / "pretrained")
        console.print(f"exported Hugging Face model to [bold]{out}[/]")
    return PretrainResult(Path(spec.run_dir), checkpoint, out, records, curve)


def run(cfg: RunConfig, resume: bool = False) -> PretrainResult:
    """The whole stage: start/join Ray, stream the corpus through the data pipeline, train, export."""
    from cluster.local_ray import ensure_ray
    from data_pipelines.pipeline import token_datasets

    check_fresh(local_run_dir(cfg) / STAGE, resume)
    ensure_ray(cfg.cluster)
    td = token_datasets(cfg.data, cfg.tokenizer, cfg.run_dir())
    return train(cfg, td.train, td.val, td.tokenizer_dir, td.seq_len, resume=resume)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run configuration YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override a.b=c")
    parser.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg, resume=args.resume)
    except RunExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
