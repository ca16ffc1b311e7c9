"""The `raylm` command line: one root app, one module per command group under cluster/commands/.

Each module in `cluster.commands` exposes `register(app)`; discovering them here keeps the command
groups independent of each other.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

import cluster.commands

app = typer.Typer(
    name="raylm",
    help="raylm: from a raw text corpus to a trained LM behind an OpenAI-compatible endpoint, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _info in sorted(pkgutil.iter_modules(cluster.commands.__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"cluster.commands.{_info.name}").register(app)


def main() -> None:
    from cluster.commands._common import exit_on_user_error
    from cluster.config import UserError

    try:
        app()
    except UserError as exc:  # auth, capacity, model-folder problems found below a command
        exit_on_user_error(exc)


if __name__ == "__main__":
    main()
