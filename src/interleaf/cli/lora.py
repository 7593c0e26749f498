"""``interleaf merge-lora IN OUT``: fold a directory's LoRA adapters into its weights."""

from __future__ import annotations

from pathlib import Path

import typer


def merge_lora_cmd(
    source: Path = typer.Argument(..., help="A directory with LoRA adapters (a LoRA stage's OUT/final)."),
    out: Path = typer.Argument(..., help="Where to write the merged model (must not exist yet)."),
) -> None:
    """Write OUT: the model of SOURCE with its adapters merged, a plain interleaf model directory.

    Its outputs equal those of SOURCE loaded with its adapters (up to float rounding); it loads without peft.
    """
    from ..api import load, save
    from ..errors import CheckpointError
    from ..model.lora import is_adapter_dir, merge_lora

    if not is_adapter_dir(source):
        raise CheckpointError(
            f"{str(source)!r} holds no LoRA adapters (no adapter_config.json); pass the final directory of a stage "
            "with a lora: section, or a directory written by interleaf.save from a model with adapters"
        )
    if out.exists():
        raise CheckpointError(f"{str(out)!r} already exists; pass a new directory for the merged model")
    model, processor = load(source)
    save(merge_lora(model), processor, out)
    typer.echo(f"merged the adapters of {source} into {out}")


def register(app: typer.Typer) -> None:
    app.command("merge-lora")(merge_lora_cmd)
