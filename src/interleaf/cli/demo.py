"""``interleaf demo``: train a tiny model from scratch on synthetic data, evaluate it, report."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_cmd(
    out: Path = typer.Option(
        None, help="Where the corpus, the stages, the report and the model go "
        "[default: runs/demo, or runs/demo_token_insertion with --fusion token_insertion]."
    ),
    seed: int = typer.Option(0, help="Seed of the corpus and of training."),
    train_scenes: int = typer.Option(8000, min=100, help="Training scenes in the synthetic corpus."),
    heldout_scenes: int = typer.Option(400, min=20, help="Held-out scenes (never seen in training)."),
    override: list[str] = typer.Option([], "--set", help="Dotted recipe override, e.g. stages.1.max_steps=100."),
    recipe: str = typer.Option(
        None, help="A recipe to run instead of the packaged demo recipe: a YAML path or a packaged recipe's name."
    ),
    fusion: str = typer.Option(
        None, help="The model family: cross_attention (the packaged recipe `demo`, the default) or "
        "token_insertion (`demo_token_insertion`: an MLP projector, vision tokens inserted into the text)."
    ),
) -> None:
    """Synthesise a corpus, train lm -> pt -> mtt -> ift (the packaged recipe `demo`, or
    `demo_token_insertion` with --fusion token_insertion), evaluate on the held-out split, and write
    OUT/metrics.json, OUT/report.html and the model OUT/final."""
    from ..demo import run_demo

    run_demo(out, seed=seed, train_scenes=train_scenes, heldout_scenes=heldout_scenes, overrides=override,
             recipe=recipe, fusion=fusion)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
