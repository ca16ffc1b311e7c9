"""`raylm submit STAGE run.yaml --address URL` and `raylm jobs list|status|logs|stop`: remote Ray jobs.

Every failure a user can fix (bad config, unknown stage, unreachable dashboard, wrong token, unknown
job id) ends as one red line and exit code 2, never a traceback. `--wait` exits with the job's outcome:
0 when it succeeded, the driver's exit code when it failed, 130 when it was stopped.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated

import typer
from ray.job_submission import JobDetails, JobStatus
from rich.table import Table

from cluster.auth import AuthError
from cluster.commands._common import ConfigArg, SetOpt, console, err_console, fail, load_or_exit
from cluster.jobs_client import JobOutcome, JobsClient, JobsError
from cluster.preflight import PreflightError, check_fits
from cluster.run_stage import STAGE_RUNS
from cluster.submit import SubmitError, submit
from data_pipelines.layout import STAGE_NAMES, runnable_stage

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Ray dashboard (Jobs API) URL, e.g. http://HEAD:8265; default: $RAY_API_SERVER_ADDRESS, "
        "then cluster.dashboard_address (submit), then the cluster of `raylm cluster up`, "
        "then http://127.0.0.1:8265",
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="submission id (see `raylm jobs list`)", show_default=False)]

_STATUS_STYLE = {
    JobStatus.PENDING: "yellow",
    JobStatus.RUNNING: "cyan",
    JobStatus.SUCCEEDED: "green",
    JobStatus.FAILED: "red",
    JobStatus.STOPPED: "magenta",
}


jobs_app = typer.Typer(
    help="List, inspect, tail and stop jobs on a Ray cluster (Ray Jobs API).", no_args_is_help=True
)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Print fixable problems as one line and exit 2 instead of a traceback."""
    # Ray's SDK logs every package upload at INFO; the command prints its own summary instead.
    logging.getLogger("ray.dashboard").setLevel(logging.WARNING)
    try:
        yield
    except (AuthError, JobsError, SubmitError, PreflightError) as exc:
        fail(str(exc).replace("[", r"\["))


def _status(status: JobStatus) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status.value}[/]"


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _print_outcome(outcome: JobOutcome) -> None:
    style = "green" if outcome.exit_code == 0 else "red"
    console.print(
        f"[{style}]job {outcome.submission_id} {outcome.status.value}[/] (exit code {outcome.exit_code})"
        + (f": {outcome.message}" if outcome.message and outcome.exit_code else ""),
        highlight=False,
    )


def _wait_and_exit(client: JobsClient, job_id: str) -> None:
    """Stream logs until the job ends, then exit with its outcome code."""
    console.print(f"[dim]following logs of {job_id} (Ctrl-C detaches; the job keeps running)[/]")
    try:
        outcome = client.wait(job_id, on_log=lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
    except KeyboardInterrupt:
        err_console.print(f"detached; stop the job with: raylm jobs stop {job_id} --address {client.address}")
        raise typer.Exit(130) from None
    _print_outcome(outcome)
    raise typer.Exit(outcome.exit_code)


def submit_command(
    stage: Annotated[
        str, typer.Argument(help=f"pipeline stage: {', '.join(STAGE_NAMES)}", show_default=False)
    ],
    config: ConfigArg,
    address: AddressOpt = None,
    set_: SetOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="follow the logs and exit with the job's outcome")
    ] = False,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="submit again even if an identical job already succeeded")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="train/finetune: continue the run from its newest checkpoint")
    ] = False,
) -> None:
    """Submit STAGE of the run in CONFIG to a Ray cluster, with the repository as working_dir.

    Submitting an identical run (same stage, resolved config and code) again attaches to the job
    already pending, running or done instead of starting a second one.
    """
    try:
        runnable = runnable_stage(stage)
    except ValueError as exc:
        fail(str(exc))
    cfg = load_or_exit(config, set_)
    with _user_errors():
        client = JobsClient(address, cfg.cluster.auth_token_file, default=cfg.cluster.dashboard_address)
        if STAGE_RUNS[runnable].uses_ray and cfg.cluster.autoscaler is not True:  # auto: no GCS here
            check_fits(cfg, runnable, client.node_resources())
        sub = submit(cfg, stage=stage, client=client, rerun=rerun, resume=resume)
        verb = "already submitted" if sub.reused else "submitted"
        console.print(
            f"[bold]{verb}[/] {sub.submission_id} ({_status(sub.status)}) to {sub.address}\n"
            f"  entrypoint  {sub.entrypoint}\n"
            f"  package     {sub.package_files} files, {sub.package_bytes / 1024:.0f} KiB\n"
            f"  run folder  {sub.metadata['raylm.storage_path'].rstrip('/')}/{cfg.cluster.run_name}\n"
            f"  config      {sub.metadata['raylm.config_hash']}  commit {sub.metadata['raylm.git_commit']}",
            highlight=False,
        )
        if not wait:
            console.print(
                f"follow with: raylm jobs logs {sub.submission_id} --follow --address {sub.address}"
            )
            return
        _wait_and_exit(client, sub.submission_id)


@jobs_app.command("list")
def list_jobs(address: AddressOpt = None) -> None:
    """Every job on the cluster, newest first."""
    with _user_errors():
        jobs = JobsClient(address).list()
    table = Table(title=f"{len(jobs)} job(s)", title_justify="left")
    # Ids stay whole on one line (users copy them); the other columns give way on narrow terminals.
    ids = [job.submission_id or job.job_id or "-" for job in jobs]
    table.add_column("submission id", no_wrap=True, min_width=max(map(len, ids), default=13))
    table.add_column("status", no_wrap=True, min_width=9)
    for col in ("stage", "run", "started", "entrypoint"):
        table.add_column(col, overflow="fold")
    for job, job_id in zip(jobs, ids, strict=True):
        meta = job.metadata or {}
        table.add_row(
            job_id,
            _status(job.status),
            meta.get("raylm.stage", "-"),
            meta.get("raylm.run_name", "-"),
            _when(job.start_time),
            job.entrypoint,
        )
    console.print(table)


def _describe(job: JobDetails) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("submission id", job.submission_id or "-"),
        ("status", _status(job.status)),
        ("message", job.message or "-"),
        ("exit code", "-" if job.driver_exit_code is None else str(job.driver_exit_code)),
        ("entrypoint", job.entrypoint),
        ("started", _when(job.start_time)),
        ("ended", _when(job.end_time)),
    ]
    rows += [(key, value) for key, value in sorted((job.metadata or {}).items())]
    for key, value in rows:
        table.add_row(key, value)
    return table


@jobs_app.command("status")
def status(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Status, exit code, timing and raylm metadata (stage, run, config hash, commit) of one job."""
    with _user_errors():
        job = JobsClient(address).info(job_id)
    console.print(_describe(job))


@jobs_app.command("logs")
def logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
) -> None:
    """Print a job's driver logs; with --follow, stream them and exit with the job's outcome."""
    with _user_errors():
        client = JobsClient(address)
        if follow:
            _wait_and_exit(client, job_id)
        sys.stdout.write(client.logs(job_id))


@jobs_app.command("stop")
def stop(
    job_id: JobIdArg,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="block until the job has stopped")] = True,
) -> None:
    """Ask the cluster to stop a job (its processes get SIGTERM, then SIGKILL)."""
    with _user_errors():
        client = JobsClient(address)
        if not client.stop(job_id):
            job = client.info(job_id)
            console.print(f"job {job_id} had already ended: {_status(job.status)}")
            return
        if wait:
            outcome = client.wait(job_id, poll_s=0.5)
            console.print(f"job {job_id} {_status(outcome.status)}")
        else:
            console.print(f"stop requested for {job_id}")


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_command)
    app.add_typer(jobs_app, name="jobs")
