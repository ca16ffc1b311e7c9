"""Command groups of the `raylm` CLI; every public module here has `register(app: typer.Typer)`."""
