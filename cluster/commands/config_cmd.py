"""`raylm config validate|show`: check a run file and print it resolved, defaults included."""

from __future__ import annotations

import typer
from rich.syntax import Syntax

from cluster.commands._common import ConfigArg, SetOpt, console, load_or_exit
from cluster.config import dump_config

config_app = typer.Typer(help="Validate a run configuration or show it resolved with every default.")


@config_app.command("validate")
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check FILE (and --set overrides) against every section's schema; exit 2 naming each bad field."""
    load_or_exit(config, set_)
    console.print(f"[green]ok[/] {config} is a valid raylm run configuration")


@config_app.command("show")
def show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved configuration of FILE: overrides applied, every default filled in."""
    cfg = load_or_exit(config, set_)
    console.print(Syntax(dump_config(cfg), "yaml", theme="ansi_dark", background_color="default"))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
