"""``interleaf train CONFIG [key.sub=value ...]``: run a training stage or a recipe of stages."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def train_cmd(
    config: str = typer.Argument(
        ..., help="A stage or recipe YAML, or a packaged recipe's name (`interleaf recipes` lists them), e.g. sft_llava."
    ),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Dotted overrides read as YAML values: optim.lr=3e-4 max_steps=200 checkpoint.every=50. "
        "In a recipe, stages.NAME.key=value sets one stage; other keys set every stage.",
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Start (the first stage) from this save_pretrained directory, e.g. runs/demo/final."
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Train on this LLaVA-format JSON (a one-source llava mixture) instead of the config's data."
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", help="The folder the image paths in --data are relative to (default: the JSON's folder)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (a recipe's stages go to OUT/NAME)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest checkpoint in the output folder; finished stages are skipped."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train: the model, data, freezing, optimiser and schedule come from CONFIG (a YAML path or a recipe name).

    Writes OUT/final (a save_pretrained directory), OUT/checkpoints/step-N, OUT/metrics.jsonl and OUT/summary.json.

    Several processes: torchrun --standalone --nproc_per_node 2 -m interleaf train CONFIG distributed.strategy=fsdp
    """
    from transformers.utils import logging as hf_logging

    from ..distributed import distributed, end_launched_process
    from ..training import train

    hf_logging.disable_progress_bar()
    with distributed() as state:  # under torchrun: one group for every stage, destroyed after success
        results = train(
            config, list(overrides or []), resume=resume, model=model, data=data, images=images, out=out,
            progress=progress, dist=state,
        )
    if state.is_main:
        for r in results:
            typer.echo(f"{r.name}: {r.final}")
    end_launched_process(state)  # under torchrun: no interpreter teardown after the work is saved


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
