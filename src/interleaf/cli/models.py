"""Verbs about models: ``interleaf presets``, ``interleaf generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def presets_cmd() -> None:
    """List the named architectures that ``interleaf.build(name)`` and ``--model NAME`` accept."""
    from ..presets import presets

    rows = presets()
    width = max(map(len, rows))
    for name, description in rows.items():
        typer.echo(f"{name:<{width}}  {description}")


def _model_dir(model: str) -> Path | None:
    """The saved directory ``--model`` names, or None for a preset name; anything else is an error.

    What names a directory is :func:`interleaf.files.names_a_directory`, the rule training stages use too.
    """
    from ..errors import CheckpointError
    from ..files import names_a_directory, user_path
    from ..presets import presets

    if names_a_directory(model, "--model"):
        path = user_path(model, "--model")
        if path.is_dir():
            return path
        raise CheckpointError(
            f"--model {model!r} is not a directory; pass a folder written by `interleaf train` or "
            "interleaf.save (it holds config.json), or a preset name (`interleaf presets` lists them)"
        )
    if model in presets():
        return None
    raise CheckpointError(
        f"--model {model!r} is neither a local directory nor a preset name; "
        f"presets: {', '.join(presets())}. Run `interleaf presets` to list them"
    )


def load_model(model: str, *, device: str | None = None, seed: int | None = None):
    """``(model, processor)`` from a saved directory, or a preset name (random weights)."""
    from ..api import build, load

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the command's output is the answer, not loading bars
    if _model_dir(model) is not None:
        m, p = load(model, device_map=device)
    else:
        m, p = build(model, seed=seed)
    return m, p


def load_processor(model: str):
    """The processor of a saved directory (its weights are not read), or of a preset."""
    from ..api import build
    from ..processing import InterleafProcessor

    directory = _model_dir(model)
    return InterleafProcessor.from_pretrained(directory) if directory is not None else build(model)[1]


def generate_cmd(
    prompt: str = typer.Argument(..., help="The text of the prompt (the question)."),
    model: str = typer.Option(..., "--model", "-m", help="A saved model directory or a preset name."),
    image: list[Path] = typer.Option([], "--image", "-i", help="An image file; repeat for several, in order."),
    max_new_tokens: int = typer.Option(64, min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy decoding."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    num_beams: int = typer.Option(1, min=1),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (and for a preset's random weights)."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat", help="Render as a chat turn (default: when the tokenizer has a chat template)."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="A static KV cache and a compiled decoding step (compiling takes a while first)."
    ),
) -> None:
    """Answer PROMPT about the images, streaming the answer."""
    from ..generation import generate_text

    m, p = load_model(model, seed=seed)
    for piece in generate_text(
        m, p, prompt, images=image, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        num_beams=num_beams, seed=seed, chat=chat, stream=True, compile=compile,
    ):
        typer.echo(piece, nl=False)
    typer.echo()


def register(app: typer.Typer) -> None:
    app.command("presets")(presets_cmd)
    app.command("generate")(generate_cmd)
