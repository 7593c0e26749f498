"""Verbs about training data: ``interleaf data synth``, ``interleaf data inspect``.

    interleaf data synth corpus/ --train-scenes 2000
    interleaf data inspect corpus/pairs/train-000000.tar -n 2
    interleaf data inspect mixture.yaml --model tiny-random
    interleaf data inspect corpus/llava/vqa_train.json --images-root corpus/images
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(
    name="data", help="Write, check and look inside training data.", no_args_is_help=True, add_completion=False
)

FORMAT_HELP = "pairs | interleaved | llava (default: guessed from the files)"


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


def _load_processor(model: str):
    from ..errors import CheckpointError
    from ..presets import presets
    from ..processing import InterleafProcessor

    if Path(model).expanduser().is_dir():
        return InterleafProcessor.from_pretrained(Path(model).expanduser())
    if model in presets():
        from ..api import build

        return build(model)[1]
    raise CheckpointError(
        f"--model {model!r} is neither a local directory nor a preset name; presets: {', '.join(presets())}"
    )


def _guess_format(files: list[str]) -> str:
    """llava for JSON files; for tar shards, interleaved if the first sample's JSON has "texts"."""
    from ..data.formats import TarSample, iter_tar_groups
    from ..errors import InputError

    if all(f.endswith((".json", ".jsonl")) for f in files):
        return "llava"
    for f in files:
        for sample in iter_tar_groups(f):
            if isinstance(sample, TarSample):
                try:
                    meta = json.loads(sample.fields.get("json", b"{}"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
                return "interleaved" if isinstance(meta, dict) and "texts" in meta else "pairs"
    raise InputError(f"cannot guess the format of {files[:3]}: no readable sample; pass --format")


def _mixture_for(source: str, fmt: Optional[str], images_root: Optional[Path]):
    from ..data.mixture import load_mixture, single_source_mixture
    from ..errors import InputError

    if source.endswith((".yaml", ".yml")):
        return load_mixture(source)
    files = sorted(glob.glob(source)) if glob.has_magic(source) else [source] if Path(source).is_file() else []
    if not files:
        raise InputError(f"SOURCE {source!r} matches no file; pass a mixture YAML, a tar shard (or glob), or a LLaVA JSON")
    fmt = fmt or _guess_format(files)
    if fmt == "llava" and images_root is None:
        images_root = _corpus_images_root(files[0])
    return single_source_mixture(files, fmt, images_root=str(images_root) if images_root else None)


def _corpus_images_root(llava_file: str) -> Optional[Path]:
    """A LLaVA file of a corpus written by ``interleaf data synth`` has its images in the corpus's images/."""
    manifest = Path(llava_file).resolve().parent.parent / "corpus.json"
    try:
        return manifest.parent / json.loads(manifest.read_text())["images_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inspect_cmd(
    source: str = typer.Argument(..., help="A mixture YAML, a tar shard or glob of shards, or a LLaVA JSON / JSON-lines file."),
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
    from ..data.formats import count_tar_samples, load_llava
    from ..data.stream import BadSampleCounter, iter_source
    from ..data.tokenize import render_sample

    mixture = _mixture_for(source, fmt, images_root)
    processor = _load_processor(model)
    limit = max_length or mixture.max_length or processor.max_length
    counter = BadSampleCounter(max_bad_fraction=1.0)
    bad_examples: list[str] = []
    typer.echo(f"{len(mixture.sources)} source(s); max_length {limit}; prompt format {processor.tokens.prompt_format!r}")
    for cfg in mixture.sources:
        files = cfg.files()
        size = sum(len(load_llava(f)) if cfg.format == "llava" else count_tar_samples(f) for f in files)
        per_epoch = f"{cfg.samples} per epoch" if cfg.samples is not None else f"weight {cfg.weight:g}"
        typer.echo(
            f"\n== {cfg.name} ({cfg.format}): {size} samples in {len(files)} file(s); {per_epoch}; "
            f"loss weight {cfg.loss_weight:g}" + (f"; task prompt {cfg.task_prompt!r}" if cfg.task_prompt else "")
        )
        shown = good = 0
        for i, (sample, bad) in enumerate(iter_source(cfg, processor, max_length=limit)):
            if i >= scan:
                break
            if bad is not None:
                counter.add_bad(cfg.name, bad)
                if len(bad_examples) < 10:
                    bad_examples.append(f"  {cfg.name}: {bad.reason}: {bad.where}: {bad.detail}")
                continue
            counter.add_good(cfg.name)
            good += 1
            if shown < n:
                shown += 1
                trained = sum(1 for label in sample["labels"] if label != -100)
                typer.echo(
                    f"-- sample {sample['key']}: {len(sample['input_ids'])} tokens, {trained} trained, "
                    f"{len(sample['images'])} image(s)"
                )
                typer.echo(render_sample(processor.tokenizer, sample["input_ids"], sample["labels"]))
        scanned = counter.seen[cfg.name]
        typer.echo(f"scanned {scanned}: {good} good, {scanned - good} bad")
    typer.echo("\nbad samples (trained tokens are shown in [[ ]] above):")
    typer.echo(counter.summary())
    for line in bad_examples:
        typer.echo(line)


def register(app: typer.Typer) -> None:
    data_app.command("synth")(synth_cmd)
    data_app.command("inspect")(inspect_cmd)
    app.add_typer(data_app, name="data")
