"""`raylm k8s render|apply|status|wait|token|delete`: the run file on Kubernetes through the raylm Helm chart.

`render` is pure (real `helm template`, no cluster needed); the others talk to the API server named by
the kubeconfig (or the pod's service account) through `cluster.kuberay`.
"""

from __future__ import annotations

import dataclasses
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from cluster.commands._common import ConfigArg, SetOpt, console, fail, load_or_exit
from cluster.config import ConfigError, RunConfig
from cluster.k8s_render import RenderError, release_name, render
from cluster.kuberay import (
    Kind,
    KubeRayClient,
    KubeRayError,
    ManifestApplier,
    RayJobStatus,
    RayServiceStatus,
    Status,
    WaitTimeoutError,
)
from cluster.model_folder import check_local_model_folder
from cluster.tools.install_helm import ToolInstallError
from data_pipelines.layout import STAGE_NAMES

k8s_app = typer.Typer(help="Render and run raylm on Kubernetes (KubeRay): RayCluster, RayJob or RayService.")


class ModeChoice(StrEnum):
    job = "job"
    service = "service"
    cluster = "cluster"


MODE_KIND = {"job": Kind.RAY_JOB, "service": Kind.RAY_SERVICE, "cluster": Kind.RAY_CLUSTER}

ModeOpt = Annotated[ModeChoice, typer.Option("--mode", "-m", help="cluster | job | service")]
StageOpt = Annotated[
    str, typer.Option("--stage", help=f"job mode: stage to run ({', '.join(STAGE_NAMES)})")
]
KubeconfigOpt = Annotated[
    str | None, typer.Option("--kubeconfig", help="kubeconfig file (default: ~/.kube/config)")
]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context")]


def _render(cfg: RunConfig, mode: str, stage: str) -> str:
    try:
        return render(cfg, mode, stage)
    except (ConfigError, RenderError, ToolInstallError) as exc:
        fail(str(exc).replace("[", r"\["))


def _client(cfg: RunConfig, kubeconfig: str | None, context: str | None) -> KubeRayClient:
    try:
        return KubeRayClient.from_kubeconfig(cfg.k8s.namespace, kubeconfig, context)
    except Exception as exc:  # kubernetes raises several config exception types
        fail(f"cannot load Kubernetes credentials: {exc}")


def _status_dict(status: Status) -> dict[str, Any]:
    out = dataclasses.asdict(status)
    out["ready"] = status.ready
    if isinstance(status, RayJobStatus):
        out["succeeded"] = status.succeeded
    return out


@k8s_app.command("render")
def render_cmd(
    config: ConfigArg,
    mode: ModeOpt = ModeChoice.cluster,
    stage: StageOpt = "pretrain",
    set_: SetOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here instead of stdout")
    ] = None,
) -> None:
    """Print the Kubernetes manifests for FILE in MODE, rendered by the raylm Helm chart."""
    cfg = load_or_exit(config, set_)
    if mode is ModeChoice.service:  # a broken local model folder fails here, not in the RayService
        check_local_model_folder(cfg.serve.model_path)
    manifests = _render(cfg, mode.value, stage)
    if output:
        output.write_text(manifests, encoding="utf-8")
        console.print(f"[green]wrote[/] {output}")
    else:
        typer.echo(manifests, nl=False)


@k8s_app.command("apply")
def apply_cmd(
    config: ConfigArg,
    mode: ModeOpt = ModeChoice.cluster,
    stage: StageOpt = "pretrain",
    set_: SetOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="take over fields another field manager changed (server-side apply)"),
    ] = False,
) -> None:
    """Render FILE and create or update every object with server-side apply (field manager `raylm`).

    A RayJob's name carries a hash of the config: a changed config starts a new run, the same config
    that already ran is refused (delete it to run it again)."""
    cfg = load_or_exit(config, set_)
    docs = [d for d in yaml.safe_load_all(_render(cfg, mode.value, stage)) if d]
    try:
        done = ManifestApplier(_client(cfg, kubeconfig, context), force=force).apply(docs)
    except KubeRayError as exc:
        fail(str(exc), code=1)
    for item in done:
        console.print(f"[green]applied[/] {item}")


@k8s_app.command("status")
def status_cmd(
    config: ConfigArg,
    mode: ModeOpt = ModeChoice.cluster,
    stage: StageOpt = "pretrain",
    set_: SetOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the status of FILE's Ray object as JSON (RayService: active/pending clusters, app health)."""
    cfg = load_or_exit(config, set_)
    try:
        status = _client(cfg, kubeconfig, context).status(
            MODE_KIND[mode.value], release_name(cfg, mode.value, stage)
        )
    except KubeRayError as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps(_status_dict(status), indent=2))


@k8s_app.command("wait")
def wait_cmd(
    config: ConfigArg,
    mode: ModeOpt = ModeChoice.cluster,
    stage: StageOpt = "pretrain",
    set_: SetOpt = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=0, help="give up after this many seconds")
    ] = 1800,
    poll_s: Annotated[float, typer.Option("--poll-s", min=0.01, help="seconds between polls")] = 5,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    running: Annotated[
        bool, typer.Option("--running", help="job mode: return once the RayJob runs, not when it ends")
    ] = False,
) -> None:
    """Wait until the RayCluster/RayService is ready or the RayJob finished (or runs, with --running).
    Exit 1 if the job failed or KubeRay rejected the spec, 3 on timeout."""
    cfg = load_or_exit(config, set_)
    if running and mode is not ModeChoice.job:
        fail("--running applies to --mode job only")
    kind, name = MODE_KIND[mode.value], release_name(cfg, mode.value, stage)
    client = _client(cfg, kubeconfig, context)
    with console.status(f"waiting for {kind.kind} {name}") as spinner:

        def show(status: Status) -> None:
            spinner.update(f"waiting for {kind.kind} {name}: {_short(status)}")

        try:
            status = client.wait(
                kind,
                name,
                timeout_s=timeout_s,
                poll_s=poll_s,
                on_poll=show,
                until="running" if running else "ready",
            )
        except WaitTimeoutError as exc:
            fail(str(exc), code=3)
        except KubeRayError as exc:
            fail(str(exc), code=1)
    if isinstance(status, RayJobStatus) and status.finished and not status.succeeded:
        fail(
            f"RayJob {name} finished as {status.deployment_status}/{status.job_status}: {status.message}",
            code=1,
        )
    console.print(f"[green]ready[/] {kind.kind} {name}: {_short(status)}")


def _short(status: Status) -> str:
    if isinstance(status, RayJobStatus):
        return f"{status.deployment_status or 'New'} / {status.job_status or '-'}"
    if isinstance(status, RayServiceStatus):
        apps = status.active.applications if status.active else {}
        return ", ".join(f"{n}={a.status}" for n, a in apps.items()) or "no applications yet"
    return status.state or "pending"


@k8s_app.command("token")
def token_cmd(
    config: ConfigArg,
    mode: ModeOpt = ModeChoice.cluster,
    stage: StageOpt = "pretrain",
    set_: SetOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the Ray auth token of FILE's cluster (from KubeRay's Secret), e.g. for a port-forwarded
    dashboard: `export RAY_AUTH_TOKEN=$(raylm k8s token run.yaml)`."""
    cfg = load_or_exit(config, set_)
    kind, name = MODE_KIND[mode.value], release_name(cfg, mode.value, stage)
    try:
        token = _client(cfg, kubeconfig, context).ray_token(kind, name)
    except KubeRayError as exc:
        fail(str(exc), code=1)
    if token is None:
        fail(f"{kind.kind} {name} runs without Ray token auth (k8s.ray_auth.enabled: false)", code=1)
    typer.echo(token)


@k8s_app.command("delete")
def delete_cmd(
    config: ConfigArg,
    mode: ModeOpt = ModeChoice.cluster,
    stage: StageOpt = "pretrain",
    set_: SetOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Delete what `apply` created for FILE (a chart-created PVC is kept: it holds the checkpoints)."""
    cfg = load_or_exit(config, set_)
    docs = [d for d in yaml.safe_load_all(_render(cfg, mode.value, stage)) if d]
    try:
        gone = ManifestApplier(_client(cfg, kubeconfig, context)).delete(docs)
    except KubeRayError as exc:
        fail(str(exc), code=1)
    if not gone:
        fail(
            f"nothing to delete for {release_name(cfg, mode.value, stage)} in namespace {cfg.k8s.namespace}",
            1,
        )
    for item in gone:
        console.print(f"[yellow]deleted[/] {item}")


def register(app: typer.Typer) -> None:
    app.add_typer(k8s_app, name="k8s")
