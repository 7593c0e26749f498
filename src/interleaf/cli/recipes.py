"""``interleaf recipes``: the training recipes shipped with the package, by name."""

from __future__ import annotations

import typer


def recipes_cmd() -> None:
    """List the packaged recipes: NAME (stages), a one-line description, the file.

    Pass a NAME to `interleaf train NAME` or `interleaf demo --recipe NAME`; copy the file (with its
    data/ folder) to edit it, and pass the copy's path instead.
    """
    from ..recipes import describe

    for info in describe():
        typer.echo(f"{info.name}  (stages: {', '.join(info.stages)})")
        typer.echo(f"    {info.description}")
        typer.echo(f"    {info.path}")


def register(app: typer.Typer) -> None:
    app.command("recipes")(recipes_cmd)
