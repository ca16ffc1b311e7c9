"""`raylm pipeline`, `raylm finetune`, `raylm eval`: the whole lifecycle in one command, or one stage."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cluster.commands._common import ConfigArg, SetOpt, console, err_console, fail, load_or_exit
from data_pipelines.layout import Stage

if TYPE_CHECKING:
    from cluster.config import RunConfig
    from cluster.deploy import Endpoint
    from cluster.pipeline import Invocation

KeepServing = Annotated[
    bool,
    typer.Option(
        "--keep-serving/--no-keep-serving",
        help="after the smoke requests, keep serving until Ctrl-C (embedded Ray ends with the command)",
    ),
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="show Ray, DeepSpeed and torch output here, not in the run's log file (or RAYLM_VERBOSE=1)",
    ),
]


def pipeline(
    config: ConfigArg,
    set_: SetOpt = None,
    keep_serving: KeepServing = False,
    verbose: Verbose = False,
) -> None:
    """Corpus to endpoint: data, tokenizer, pretrain, fine-tune, evaluate, export, deploy, smoke requests.

    Stages whose output exists and matches the config are skipped, so a rerun continues where the
    last run stopped. With eval.min_exact_match set, a model scoring below it is not deployed (exit 3).
    Everything lands in the run folder, with a report.md; the libraries' own output (Ray worker logs,
    DeepSpeed and torch warnings) goes to a log file there, unless --verbose.
    """
    cfg = load_or_exit(config, set_)
    from cluster.logs import library_output_to, log_file_for, set_verbose
    from cluster.pipeline import Invocation, with_absolute_storage

    cfg = with_absolute_storage(cfg)
    invocation = Invocation([str(config), *(a for o in set_ or [] for a in ("--set", o))], keep_serving)
    if set_verbose(verbose):
        _run(cfg, invocation, log_path=None)
        return
    log_path = log_file_for(cfg.run_dir(), "pipeline")
    console.print(
        f"[dim]library output (Ray workers, DeepSpeed, torch, Serve) → {log_path} (--verbose: here)[/]",
        highlight=False,
        soft_wrap=True,
    )
    with library_output_to(log_path, console, stderr_consoles=(err_console,)):
        try:
            _run(cfg, invocation, log_path)
        finally:
            _disconnect_ray()  # Ray's own shutdown messages belong in the log too


def _disconnect_ray() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def _run(cfg: RunConfig, invocation: Invocation, log_path: Path | None) -> None:
    from cluster.pipeline import EXIT_GATE, GateError, PipelineError, run_pipeline
    from cluster.report import endpoint_lifetime
    from cluster.run_stage import user_errors

    report = f"{cfg.run_dir()}/report.md"
    try:
        result = run_pipeline(cfg, console=console, invocation=invocation)
    except GateError as exc:
        console.print(f"report: {report}", highlight=False, soft_wrap=True)
        fail(str(exc), code=EXIT_GATE)
    except (PipelineError, *user_errors()) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        err_console.print("interrupted: running the same command again continues where this run stopped")
        raise typer.Exit(130) from None
    except Exception:
        # Worker failures arrive here as Ray exceptions carrying the worker's traceback: show it all.
        err_console.file.write(traceback.format_exc())
        where = f"; the libraries' output is in {log_path}" if log_path else ""
        err_console.print(
            f"[bold red]error:[/] the pipeline failed (report: {report}{where})", highlight=False
        )
        raise typer.Exit(1) from None
    for answer in result.answers:
        console.print(
            f"[bold cyan]Q:[/] {answer['question']}\n[bold green]A:[/] {one_line(answer['answer'])}",
            highlight=False,
        )
    ep = result.endpoint
    console.print(
        f"finished in {result.seconds:.0f} s · report: [bold]{result.report}[/]",
        highlight=False,
        soft_wrap=True,
    )
    if invocation.keep_serving and result.embedded:
        serve_until_interrupted(ep)
    for line in endpoint_lifetime(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def one_line(text: str, limit: int = 300) -> str:
    """An answer on one line (a toy model's answer can be mostly newlines), at most `limit` characters."""
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def serve_until_interrupted(ep: Endpoint) -> None:
    """--keep-serving: block until Ctrl-C (or SIGTERM) while the endpoint answers."""
    import signal
    import threading

    key = f"export OPENAI_API_KEY=$(cat {ep.key_file}); " if ep.key_file else ""
    console.print(
        f"[green]serving[/] {ep.base_url} (model {ep.model}) until Ctrl-C. In another terminal:\n"
        f"  {key}raylm chat --base-url {ep.base_url}",
        highlight=False,
        soft_wrap=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


def finetune(config: ConfigArg, set_: SetOpt = None, resume: bool = typer.Option(False, "--resume")) -> None:
    """Fine-tune (full or LoRA, causal or seq2seq) on prompt/response pairs; export to <run>/export/finetuned.

    Starts from finetune.base (default: this run's pretrained export). --resume continues a stopped
    run from its newest complete checkpoint.
    """
    from cluster.run_stage import run_stage

    run_stage(Stage.FINETUNE, load_or_exit(config, set_), resume=resume, console=console)


def evaluate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Score the run's pretrained and fine-tuned exports on held-out data (perplexity, EM, token F1).

    Writes <run>/eval/results.json and results.md.
    """
    from cluster.run_stage import run_stage

    run_stage(Stage.EVAL, load_or_exit(config, set_), console=console)


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)
    app.command("finetune")(finetune)
    app.command("eval")(evaluate)
