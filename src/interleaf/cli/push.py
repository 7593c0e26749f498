"""``interleaf push DIR REPO``: upload a saved model directory to the hub (the one network step)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def push_cmd(
    directory: Path = typer.Argument(..., help="A saved model directory (interleaf.save, OUT/final, a conversion)."),
    repo: str = typer.Argument(..., help="The hub repository, OWNER/NAME (created when absent)."),
    private: Optional[bool] = typer.Option(None, "--private/--public", help="The new repository's visibility."),
    revision: Optional[str] = typer.Option(None, help="The branch to upload to (default: main)."),
    message: Optional[str] = typer.Option(None, help="The commit message."),
) -> None:
    """Upload DIRECTORY (with its model card, README.md) to the hub repository REPO.

    Needs the network and a token (HF_TOKEN or `hf auth login`); refused when HF_HUB_OFFLINE is set.
    """
    from ..cards import push

    url = push(directory, repo, private=private, revision=revision, message=message)
    typer.echo(f"pushed {directory} to {url}")


def register(app: typer.Typer) -> None:
    app.command("push")(push_cmd)
