"""`raylm data prepare`: read, clean, tokenize and pack the corpus into Parquet token shards."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cluster.commands._common import ConfigArg, SetOpt, console, fail, load_or_exit

data_app = typer.Typer(help="Prepare the training corpus: clean, tokenize and pack it with Ray Data.")


@data_app.command("prepare")
def prepare_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="rebuild the shards even when they are current")
    ] = False,
) -> None:
    """Materialise the corpus of FILE as Parquet token shards plus manifest.json, then print a summary.

    Trains the tokenizer first when the run has none yet. Current shards (same tokenizer hash, seq_len,
    data settings and input files, as recorded in the manifest) are kept unless --force.
    """
    cfg = load_or_exit(config, set_)
    from ray.data import DataContext

    from cluster.local_ray import ensure_ray
    from cluster.preflight import preflight
    from data_pipelines.pipeline import DataPipelineError, current_manifest, prepare, shards_dir_of
    from data_pipelines.readers import CorpusNotFoundError, list_inputs
    from data_pipelines.stats import CorpusStats

    if cfg.data.paths:  # a missing corpus is bad input: refuse it before starting Ray
        try:
            list_inputs(cfg.data.paths, cfg.data.format)
        except CorpusNotFoundError as exc:
            fail(str(exc))
    ensure_ray(cfg.cluster)
    preflight(cfg, "tokens", console)
    DataContext.get_current().enable_progress_bars = False  # the rich display below replaces them
    seq_len = cfg.data.seq_len
    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("reading corpus, training tokenizer if needed…", total=None)

        def on_blocks(split: str, blocks: int) -> None:
            tokens = blocks * seq_len
            rate = tokens / max(time.monotonic() - started, 1e-6)
            text = f"{split}: {blocks:,} blocks, {tokens:,} tokens ({rate:,.0f} tok/s)"
            progress.update(task, description=text)

        try:
            manifest = None if force else current_manifest(cfg.data, cfg.tokenizer, cfg.run_dir())
            reused = manifest is not None
            if manifest is None:
                manifest = prepare(cfg.data, cfg.tokenizer, cfg.run_dir(), on_blocks=on_blocks)
        except (DataPipelineError, CorpusNotFoundError) as exc:
            fail(str(exc))
        progress.update(
            task, description="shards are current: reused (--force rebuilds)" if reused else "done"
        )
    console.print(CorpusStats.from_dict(manifest["stats"]).table())
    console.print(
        f"shards: {shards_dir_of(cfg.data, cfg.run_dir())}  tokenizer: {manifest['tokenizer_dir']}  "
        f"({time.monotonic() - started:.1f}s)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
