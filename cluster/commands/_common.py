"""Helpers every command shares: loading the run config with `--set` overrides, and clean failures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from cluster.config import ConfigError, RunConfig, UserError, load_config

console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="run configuration YAML file", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config value by dotted path, e.g. --set train.lr=3e-4"),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user-facing error (no traceback) and exit with `code` (2 = bad input)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def load_or_exit(path: Path | None, overrides: list[str] | None) -> RunConfig:
    """Load and validate the config before any work starts; a bad config exits with code 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        fail(str(exc).replace("[", r"\["))


def exit_on_user_error(exc: UserError) -> NoReturn:
    """What `raylm` does with a UserError that escaped a command: one red line, exit code 2."""
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise SystemExit(2)
