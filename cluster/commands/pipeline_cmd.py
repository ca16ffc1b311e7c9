"""`raylm pipeline`, `raylm finetune`, `raylm eval`: the whole lifecycle in one command, or one stage."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from cluster.commands._common import ConfigArg, SetOpt, console, fail, load_or_exit

KeepServing = Annotated[
    bool,
    typer.Option(
        "--keep-serving/--no-keep-serving",
        help="after the smoke requests, keep serving until Ctrl-C (embedded Ray ends with the command)",
    ),
]


def _user_errors() -> tuple[type[Exception], ...]:
    from data_pipelines.pipeline import DataPipelineError
    from data_pipelines.readers import CorpusNotFoundError
    from jobs.export import ExportError
    from jobs.finetune import FinetuneError
    from jobs.sft_data import SftDataError
    from jobs.train_loop import RunExistsError

    return (DataPipelineError, CorpusNotFoundError, ExportError, FinetuneError, SftDataError, RunExistsError)


def pipeline(config: ConfigArg, set_: SetOpt = None, keep_serving: KeepServing = False) -> None:
    """Corpus to endpoint: data, tokenizer, pretrain, fine-tune, evaluate, export, deploy, smoke requests.

    Stages whose output exists and matches the config are skipped, so a rerun continues where the
    last run stopped. With eval.min_exact_match set, a model scoring below it is not deployed (exit 3).
    Everything lands in the run folder, with a report.md.
    """
    cfg = load_or_exit(config, set_)
    from cluster.pipeline import EXIT_GATE, GateError, PipelineError, outcome_table, run_pipeline

    try:
        result = run_pipeline(cfg, console=console)
    except GateError as exc:
        fail(str(exc), code=EXIT_GATE)
    except (PipelineError, *_user_errors()) as exc:
        fail(str(exc))
    console.print(outcome_table(result.outcomes))
    for answer in result.answers:
        console.print(
            f"[bold cyan]Q:[/] {answer['question']}\n[bold green]A:[/] {answer['answer']}\n", highlight=False
        )
    ep = result.endpoint
    console.print(f"endpoint: [bold]{ep.base_url}[/] (model {ep.model}; API key {ep.key_source})")
    console.print(f"finished in {result.seconds:.0f} s · report: {result.report}")
    if keep_serving:
        console.print("serving until Ctrl-C …")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def finetune(config: ConfigArg, set_: SetOpt = None, resume: bool = typer.Option(False, "--resume")) -> None:
    """Fine-tune (full or LoRA, causal or seq2seq) on prompt/response pairs; export to <run>/export/finetuned.

    Starts from finetune.base (default: this run's pretrained export). --resume continues a stopped
    run from its newest complete checkpoint.
    """
    cfg = load_or_exit(config, set_)
    from cluster.preflight import join_and_check
    from jobs.finetune import run

    join_and_check(cfg, "finetune", console)

    try:
        out = run(cfg, resume=resume)
    except _user_errors() as exc:
        fail(str(exc))
    console.print(f"fine-tuned model: {out}")


def evaluate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Score the run's pretrained and fine-tuned exports on held-out data (perplexity, EM, token F1).

    Writes <run>/eval/results.json and results.md.
    """
    cfg = load_or_exit(config, set_)
    from cluster.model_folder import check_run_exports
    from cluster.preflight import join_and_check
    from jobs.evaluate import results_markdown, run

    check_run_exports(cfg.run_dir())  # a broken export fails in one line before Ray starts
    join_and_check(cfg, "eval", console)

    try:
        results = run(cfg)
    except (FileNotFoundError, *_user_errors()) as exc:
        fail(str(exc))
    console.print(results_markdown(results), markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)
    app.command("finetune")(finetune)
    app.command("eval")(evaluate)
