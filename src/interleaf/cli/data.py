"""Verbs about training data: ``interleaf data synth``, ``interleaf data inspect``, ``interleaf data convert``.

    interleaf data synth corpus/ --train-scenes 2000
    interleaf data inspect corpus/pairs/train-000000.tar -n 2
    interleaf data inspect mixture.yaml --model tiny-random
    interleaf data inspect corpus/llava/vqa_train.json --images-root corpus/images
    interleaf data convert llava-instruct-mix-vsft/data/train-*.parquet vsft/     # -> vsft/llava.jsonl + images/
    interleaf data convert corpus/llava/vqa_train.json vqa-parquet/ --images-root corpus/images
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from ..data.inspection import SourceReport

data_app = typer.Typer(
    name="data", help="Write, check and look inside training data.", no_args_is_help=True, add_completion=False
)

FORMAT_HELP = "pairs | interleaved | llava | preference (default: guessed from the files)"
SOURCE_HELP = "A mixture YAML, a tar shard or glob of shards, a LLaVA JSON / JSON-lines file, or parquet / Arrow files (a glob)."


def synth_cmd(
    out: Path = typer.Argument(..., help="Folder to write the corpus into."),
    seed: int = typer.Option(0, help="The corpus is a pure function of the seed."),
    train_scenes: int = typer.Option(10_000, min=1, help="Training scenes (one pair, five VQA, one chat each)."),
    heldout_scenes: int = typer.Option(500, min=1, help="Held-out scenes (evaluation only)."),
    image_size: int = typer.Option(32, min=16, help="Side of each rendered image in pixels."),
    overwrite: bool = typer.Option(False, help="Replace a corpus already in OUT."),
) -> None:
    """Write the synthetic shape-scene corpus (pairs, documents, LLaVA JSON) to OUT."""
    from ..data.synth import write_corpus

    manifest = write_corpus(
        out, seed=seed, n_train_scenes=train_scenes, n_heldout_scenes=heldout_scenes, image_size=image_size,
        overwrite=overwrite,
    )
    typer.echo(f"wrote {out}:")
    for name, n in manifest["counts"].items():
        typer.echo(f"  {name:<24} {n}")


def inspect_cmd(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    model: str = typer.Option("tiny-random", "--model", "-m", help="A saved model directory or a preset (its processor renders the samples)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    images_root: Optional[Path] = typer.Option(
        None, help="LLaVA: the folder image paths are relative to (default: the JSON's folder, or a synth corpus's images/)."
    ),
    n: int = typer.Option(3, "-n", min=0, help="Samples to show per source."),
    scan: int = typer.Option(200, min=1, help="Samples to tokenise per source when looking for bad ones."),
    max_length: Optional[int] = typer.Option(None, help="Truncate to this many tokens (default: the mixture's, else the model's)."),
) -> None:
    """Show a source's size, a few samples with their trained tokens in [[ ]], and its bad samples."""
    from ..data.inspection import MAX_BAD_EXAMPLES, inspect_source, mixture_for_source
    from ..data.stream import BadSampleCounter
    from .models import load_processor

    mixture = mixture_for_source(source, fmt, images_root)
    processor = load_processor(model)
    limit = max_length or mixture.max_length or processor.max_length
    counter = BadSampleCounter(max_bad_fraction=1.0)
    bad_examples: list[str] = []
    typer.echo(f"{len(mixture.sources)} source(s); max_length {limit}; prompt format {processor.tokens.prompt_format!r}")
    for cfg in mixture.sources:
        report = inspect_source(cfg, processor, counter=counter, max_length=limit, show=n, scan=scan)
        _echo_source(report)
        bad_examples += [f"  {cfg.name}: {bad.reason}: {bad.where}: {bad.detail}" for bad in report.bad]
    typer.echo("\nbad samples (trained tokens are shown in [[ ]] above):")
    typer.echo(counter.summary())
    for line in bad_examples[:MAX_BAD_EXAMPLES]:
        typer.echo(line)


def _echo_source(report: SourceReport) -> None:
    """One source's header, its shown samples and its scan count, as ``interleaf data inspect`` prints them."""
    cfg = report.source
    per_epoch = f"{cfg.samples} per epoch" if cfg.samples is not None else f"weight {cfg.weight:g}"
    typer.echo(
        f"\n== {cfg.name} ({cfg.format}): {report.size} samples in {report.num_files} file(s); {per_epoch}; "
        f"loss weight {cfg.loss_weight:g}" + (f"; task prompt {cfg.task_prompt!r}" if cfg.task_prompt else "")
    )
    for shown in report.shown:
        typer.echo(
            f"-- sample {shown.key}: {shown.num_tokens} tokens, {shown.num_trained} trained, "
            f"{shown.num_images} image(s)"
        )
        typer.echo(shown.rendered)
    typer.echo(f"scanned {report.scanned}: {report.good} good, {report.scanned - report.good} bad")


def convert_cmd(
    source: str = typer.Argument(..., help=SOURCE_HELP + " A mixture YAML must hold one source."),
    out: Path = typer.Argument(..., help="A new or empty folder to write the converted files to."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    images_root: Optional[Path] = typer.Option(None, help="The folder relative image paths are read from."),
    download_images: bool = typer.Option(
        False, help="Fetch http(s) images (OBELICS) into the output; the only step that downloads data. Off: such rows are skipped and counted."
    ),
    per_file: int = typer.Option(10_000, min=1, help="Samples per output shard or parquet file."),
    row_group_size: int = typer.Option(100, min=1, help="Rows per parquet row group (the unit a stream reads)."),
) -> None:
    """Convert parquet / Arrow files (Hugging Face datasets) to interleaf's formats, or interleaf's files to parquet."""
    from ..data.conversion import convert
    from ..data.inspection import MAX_BAD_EXAMPLES, mixture_for_source
    from ..errors import InputError

    mixture = mixture_for_source(source, fmt, images_root)
    if len(mixture.sources) != 1:
        raise InputError(f"{source!r} holds {len(mixture.sources)} sources; convert one source (its files) at a time")
    report = convert(mixture.sources[0], out, per_file=per_file, row_group_size=row_group_size,
                     download_images=download_images)
    typer.echo(f"wrote {report.written} samples to {out}:")
    for name, n in report.files.items():
        typer.echo(f"  {name:<28} {n}")
    typer.echo("bad samples (skipped):")
    typer.echo(report.bad.summary())
    for (source_name, reason), examples in list(report.bad.examples.items())[:MAX_BAD_EXAMPLES]:
        typer.echo(f"  {source_name}: {reason}: {examples[0]}")


def register(app: typer.Typer) -> None:
    data_app.command("synth")(synth_cmd)
    data_app.command("inspect")(inspect_cmd)
    data_app.command("convert")(convert_cmd)
    app.add_typer(data_app, name="data")
