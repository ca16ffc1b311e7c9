"""`raylm train RUN.yaml [--resume]` and `raylm export RUN_OR_CHECKPOINT OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.commands._common import ConfigArg, SetOpt, console, fail, load_or_exit
from data_pipelines.layout import Stage


def train(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue this run from its newest complete checkpoint")
    ] = False,
) -> None:
    """Pretrain the model of RUN.yaml on Ray Train + DeepSpeed, then export it to <run>/export/pretrained.

    Without --resume a run whose folder already holds checkpoints is refused, so nothing is overwritten.
    """
    from cluster.run_stage import run_stage

    run_stage(Stage.PRETRAIN, load_or_exit(config, set_), resume=resume, console=console)


def export(
    src: Annotated[str, typer.Argument(help="checkpoint folder, stage folder, run folder or run name")],
    out: Annotated[Path, typer.Argument(help="output Hugging Face folder")],
    config: Annotated[
        Path | None, typer.Option("--config", help="run YAML, for cluster.storage_path with a run name")
    ] = None,
    set_: SetOpt = None,
    max_shard_size: Annotated[str, typer.Option(help="safetensors shard size")] = "2GB",
) -> None:
    """Consolidate the newest complete checkpoint of SRC into a Hugging Face folder OUT."""
    from jobs.export import ExportError
    from jobs.export import export as export_model

    storage = load_or_exit(config, set_).cluster.storage_path if config or set_ else "runs"
    try:
        path = export_model(src, out, storage, max_shard_size)
    except ExportError as exc:
        fail(str(exc))
    console.print(f"[green]exported[/] {path}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("export")(export)
