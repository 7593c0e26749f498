"""``interleaf convert ...``: checkpoint converters on the command line.

    interleaf convert idefics SRC DST          transformers IDEFICS directory -> interleaf
    interleaf convert to-idefics SRC DST       interleaf (IDEFICS architecture) -> transformers IDEFICS
    interleaf convert openflamingo CKPT DST --lm LM --vision CLIP --every N
                                               OpenFlamingo checkpoint.pt (released or training-script
                                               form) + base LM + open_clip or transformers CLIP -> interleaf
    interleaf convert llava SRC DST            transformers LLaVA directory (either hub layout) -> interleaf
    interleaf convert llava SRC DST --to llava interleaf (LLaVA architecture) -> transformers LLaVA
    interleaf convert xgen-mm SRC DST          released xGen-MM (BLIP-3) r-v1.5 folder -> interleaf
    interleaf convert llava-next SRC DST       transformers LLaVA-NeXT directory (either hub layout) -> interleaf
    interleaf convert infimm SRC DST           InfiMM checkpoint folder (config.json + pytorch_model.bin or
                                               safetensors) -> interleaf
    interleaf convert llava-next SRC DST --to llava-next
                                               interleaf (LLaVA-NeXT architecture) -> transformers LLaVA-NeXT
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

convert_app = typer.Typer(
    name="convert", help="Convert checkpoints between interleaf and the seeds' formats.", no_args_is_help=True
)


@convert_app.command("idefics")
def idefics_cmd(
    src: Path = typer.Argument(..., help="IDEFICS directory written by save_pretrained (with its tokenizer)."),
    dst: Path = typer.Argument(..., help="Output interleaf directory."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory, if SRC has none."),
) -> None:
    """Convert a transformers IDEFICS checkpoint into an interleaf model directory."""
    from ..convert import from_idefics

    out = from_idefics(src, dst, tokenizer=tokenizer)
    typer.echo(f"wrote {out}")


@convert_app.command("to-idefics")
def to_idefics_cmd(
    src: Path = typer.Argument(..., help="interleaf directory with IDEFICS' architecture."),
    dst: Path = typer.Argument(..., help="Output transformers IDEFICS directory."),
) -> None:
    """Convert an interleaf model with IDEFICS' architecture back to transformers' IDEFICS."""
    from ..convert import to_idefics

    out = to_idefics(src, dst)
    typer.echo(f"wrote {out}")


@convert_app.command("openflamingo")
def openflamingo_cmd(
    checkpoint: Path = typer.Argument(..., help="OpenFlamingo checkpoint: the released checkpoint.pt (flat state "
                                      "dict) or the training script's checkpoint_<epoch>.pt (model_state_dict)."),
    dst: Path = typer.Argument(..., help="Output interleaf directory."),
    lm: Path = typer.Option(..., "--lm", help="The base LM as a local transformers directory (with tokenizer)."),
    vision: Path = typer.Option(..., "--vision", help="The CLIP vision tower: an open_clip directory "
                                "(open_clip_config.json + open_clip_model.safetensors) or a transformers CLIP "
                                "directory."),
    every: int = typer.Option(1, "--every", min=1, help="cross_attn_every_n_layers: 1 (3B), 2 (4B), 4 (9B)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory, if not the LM's."),
    patch_ln_post: bool = typer.Option(
        False, "--patch-ln-post/--no-patch-ln-post",
        help="Pass the patch tokens through the tower's final ln_post, as open_clip >= 2.23 does. The released "
        "OpenFlamingo v2 weights were trained with open_clip 2.20, without it (the default).",
    ),
    head_key: Optional[str] = typer.Option(
        None, "--head-key", help="The checkpoint's name of an untied output head, if neither the installed "
        "transformers' module name nor its other-version name (GPT-NeoX: embed_out / lm_head).",
    ),
    added_head_rows: str = typer.Option(
        "lm", "--added-head-rows", help="Without a saved output head, the added tokens' output rows: lm (the "
        "resized base LM's rows, what OpenFlamingo computed with; default) or zeros.",
    ),
) -> None:
    """Import an OpenFlamingo checkpoint with its base LM and vision tower."""
    from ..convert import from_openflamingo

    out = from_openflamingo(
        checkpoint, lm, vision, dst, cross_attn_every_n_layers=every, tokenizer=tokenizer,
        patch_ln_post=patch_ln_post, head_key=head_key, added_head_rows=added_head_rows,
    )
    typer.echo(f"wrote {out}")


@convert_app.command("llava")
def llava_cmd(
    src: Path = typer.Argument(..., help="LLaVA directory (save_pretrained or a llava-hf download), or with "
                               "--to llava an interleaf directory."),
    dst: Path = typer.Argument(..., help="Output directory."),
    to: str = typer.Option("interleaf", "--to", help="interleaf: LLaVA -> interleaf; llava: interleaf -> LLaVA."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory, if SRC has none."),
) -> None:
    """Convert a transformers LLaVA checkpoint to interleaf, or back with --to llava."""
    from ..convert import from_llava, to_llava
    from ..errors import InputError

    if to == "interleaf":
        out = from_llava(src, dst, tokenizer=tokenizer)
    elif to == "llava":
        out = to_llava(src, dst)
    else:
        raise InputError(f"--to must be 'interleaf' or 'llava', got {to!r}")
    typer.echo(f"wrote {out}")


@convert_app.command("xgen-mm")
def xgenmm_cmd(
    src: Path = typer.Argument(..., help="Released xGen-MM folder: config.json, model.safetensors (or shards with "
                               "model.safetensors.index.json), tokenizer files if present."),
    dst: Path = typer.Argument(..., help="Output interleaf directory."),
    mode: str = typer.Option("auto", "--mode", help="instruct: one <image> per image, anyres; base: <image> + "
                             "placeholders, one view; auto: the config's image_aspect_ratio decides."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory, if SRC has none."),
) -> None:
    """Convert a released xGen-MM (BLIP-3) checkpoint to interleaf (safetensors only)."""
    from ..convert.xgenmm import from_xgenmm
    from ..errors import InputError

    if mode not in ("auto", "instruct", "base"):
        raise InputError(f"--mode must be 'auto', 'instruct' or 'base', got {mode!r}")
    out = from_xgenmm(src, dst, tokenizer=tokenizer, mode=mode)
    typer.echo(f"wrote {out}")
    if not (out / "tokenizer_config.json").is_file():
        typer.echo("note: no tokenizer was found, so the directory holds the model without a processor; "
                   "pass --tokenizer <the checkpoint's tokenizer folder> for one that interleaf.load reads")


@convert_app.command("llava-next")
def llava_next_cmd(
    src: Path = typer.Argument(..., help="LLaVA-NeXT directory (save_pretrained or a llava-hf download), or with "
                               "--to llava-next an interleaf directory."),
    dst: Path = typer.Argument(..., help="Output directory."),
    to: str = typer.Option("interleaf", "--to",
                           help="interleaf: LLaVA-NeXT -> interleaf; llava-next: interleaf -> LLaVA-NeXT."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory, if SRC has none."),
) -> None:
    """Convert a transformers LLaVA-NeXT checkpoint to interleaf, or back with --to llava-next."""
    from ..convert.llava_next import from_llava_next, to_llava_next
    from ..errors import InputError

    if to == "interleaf":
        out = from_llava_next(src, dst, tokenizer=tokenizer)
    elif to == "llava-next":
        out = to_llava_next(src, dst)
    else:
        raise InputError(f"--to must be 'interleaf' or 'llava-next', got {to!r}")
    typer.echo(f"wrote {out}")


@convert_app.command("infimm")
def infimm_cmd(
    src: Path = typer.Argument(..., help="InfiMM folder: config.json, pytorch_model.bin or model.safetensors (or "
                               "shards with their index), tokenizer files if present."),
    dst: Path = typer.Argument(..., help="Output interleaf directory."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory, if SRC has none."),
    perceiver_heads: int = typer.Option(8, "--perceiver-heads", min=1, help="The perceiver's heads (InfiMM: 8)."),
    xattn_heads: int = typer.Option(8, "--xattn-heads", min=1, help="The cross-attention's heads (InfiMM: 8)."),
    lm_type: Optional[str] = typer.Option(None, "--lm-type", help="The LM's transformers model_type, when the "
                                          "config's 'language' names none (default: mistral with sliding_window, "
                                          "else llama)."),
) -> None:
    """Convert an InfiMM checkpoint (EVA-CLIP tower, perceiver, gated cross-attention, LM) to interleaf."""
    from ..convert.infimm import from_infimm

    out = from_infimm(src, dst, tokenizer=tokenizer, perceiver_heads=perceiver_heads, xattn_heads=xattn_heads,
                      lm_type=lm_type)
    typer.echo(f"wrote {out}")
    if not (out / "tokenizer_config.json").is_file():
        typer.echo("note: no tokenizer was found, so the directory holds the model without a processor; "
                   "pass --tokenizer <the checkpoint's tokenizer folder> for one that interleaf.load reads")


def register(app: typer.Typer) -> None:
    app.add_typer(convert_app, name="convert")
