"""`raylm serve MODEL_DIR | run.yaml`: the OpenAI-compatible endpoint on the embedded or joined Ray.

Blocks until Ctrl-C (or SIGTERM), then deletes the app: Serve drains in-flight streams for up to
`serve.graceful_shutdown_timeout_s` before the replicas stop.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from cluster.commands._common import SetOpt, console, fail, load_or_exit
from cluster.config import RunConfig
from cluster.model_folder import check_model_folder
from data_pipelines.layout import EXPORT_NAMES

APP_NAME = "raylm"

Target = Annotated[
    Path,
    typer.Argument(help="a Hugging Face model folder, or a run YAML (serves serve.model_path or its export)"),
]


def resolve(target: Path, overrides: list[str] | None) -> tuple[RunConfig, Path]:
    """(config, model folder) for a folder argument or a run file."""
    if target.is_dir():
        return load_or_exit(None, overrides), target
    cfg = load_or_exit(target, overrides)
    if cfg.serve.model_path:
        return cfg, Path(cfg.serve.model_path)
    for name in EXPORT_NAMES:
        folder = cfg.layout().export(name)
        if (folder / "config.json").is_file():
            return cfg, folder
    fail(f"nothing to serve: serve.model_path is unset and {cfg.run_dir()}/export has no exported model")


def last_error_line(message: str) -> str:
    """The line of a Serve deployment failure that says what went wrong: its last `SomeError: ...`
    line (the end of the replica's traceback), else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", line)]
    if errors:
        return errors[-1]
    return lines[0] if lines else "unknown error"


def replica_error(app_name: str) -> str | None:
    """The last error of a failed deployment of the app (Serve keeps the replica's traceback there)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    for deployment in (app.deployments.values() if app else []):
        if deployment.status in ("DEPLOY_FAILED", "UNHEALTHY") and deployment.message:
            return last_error_line(deployment.message)
    return None


def serve_command(target: Target, set_: SetOpt = None) -> None:
    """Serve MODEL_DIR (or the model of run.yaml) at /v1/completions, /v1/chat/completions, /v1/models."""
    cfg, folder = resolve(target, set_)
    check_model_folder(folder)  # a broken folder fails here, in one line, before Ray starts

    import ray
    from ray import serve

    from cluster.deploy import app_urls
    from cluster.local_ray import ensure_ray
    from cluster.preflight import preflight
    from serve.app import build_app

    try:
        app = build_app({"model_path": str(folder), "serve": cfg.serve.model_dump(mode="json")})
    except ValueError as exc:
        fail(str(exc))
    embedded = not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    # Serve's controller and replicas log to files (`<session>/logs/serve`); on stderr, streamed here,
    # a failing replica would print its traceback once per retry. Applies to an embedded Ray only.
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ensure_ray(cfg.cluster)
    preflight(cfg, "serve", console)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    with console.status(f"deploying {folder} (model replicas load the weights)..."):
        try:
            serve.run(app, name=APP_NAME, route_prefix=cfg.serve.route_prefix)
        except RuntimeError as exc:  # Serve gave up on the app after its replicas failed to start
            reason = replica_error(APP_NAME) or last_error_line(str(exc))
            serve.delete(APP_NAME)
            if embedded:
                serve.shutdown()
                ray.shutdown()
            fail(f"the model replicas failed to start: {reason}", code=1)
    base, direct = app_urls(APP_NAME, cfg.serve.route_prefix)
    model = cfg.serve.model_name or folder.name
    console.print(f"[green]serving[/] {model} at [bold]{base}[/]  (Ctrl-C to stop)", highlight=False)
    for url in direct:
        console.print(f"  a replica's own port (no proxy hop): {url}", highlight=False)
    if not cfg.serve.require_api_key:
        console.print("[yellow]warning:[/] API keys are not required (serve.require_api_key=false)")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    console.print("shutting down: draining in-flight requests...")
    serve.delete(APP_NAME)
    if embedded:
        serve.shutdown()
        ray.shutdown()
    console.print("[green]stopped[/]")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
