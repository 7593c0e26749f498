"""Model cards and the hub: ``interleaf card DIR`` (re)writes a saved model's card offline;
``interleaf push DIR REPO`` uploads the directory (the one network step)."""

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


def card_cmd(
    directory: Path = typer.Argument(..., help="A saved model directory."),
    results: Optional[Path] = typer.Option(None, help="An `interleaf eval --out DIR` results.json: the card's evaluation."),
    base_model: list[str] = typer.Option([], "--base-model", help="A hub id this model derives from (repeatable)."),
    dataset: list[str] = typer.Option([], "--dataset", help="A hub dataset id it was trained on (repeatable)."),
) -> None:
    """Write DIRECTORY/README.md, the model card (offline), keeping what the card already records
    (base models, datasets, training stages, and evaluation results unless --results replaces them).

    A README.md interleaf did not write is left as it is.
    """
    from ..cards import write_model_card
    from ..errors import InputError

    if not (directory / "config.json").is_file():
        raise InputError(f"{str(directory)!r} is not a saved model directory (no config.json); pass the directory "
                         "interleaf.save, `interleaf train` (OUT/final) or `interleaf convert` wrote")
    written = write_model_card(directory, base_model=base_model or None, datasets=dataset or None,
                               evaluation=results, carry_from=directory, keep_evaluation=True)
    typer.echo(f"wrote {written}" if written else f"kept {directory / 'README.md'}: it was not written by interleaf")


def register(app: typer.Typer) -> None:
    app.command("card")(card_cmd)
    app.command("push")(push_cmd)
