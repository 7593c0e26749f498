"""Look inside training data: what format files are in, the mixture a path stands for, and what
a source's samples become once tokenised (trained tokens marked, bad samples counted).

``interleaf data inspect`` is these functions plus printing::

    mixture = mixture_for_source("corpus/pairs/*.tar")          # or a mixture YAML, or a LLaVA JSON
    counter = BadSampleCounter(max_bad_fraction=1.0)           # shared by the sources: one summary
    for cfg in mixture.sources:
        report = inspect_source(cfg, processor, counter=counter, max_length=256, show=2)
        report.shown[0].rendered                              # "<s><image>[[a red square.</s>]]"
                                                              # (LLaVA's placement: "<s><image>*576[[...")
    counter.summary()
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..files import read_json
from .formats import BadSample, TarSample, iter_tar_groups, load_llava
from .mixture import MixtureConfig, SourceConfig, load_mixture, single_source_mixture
from .stream import BadSampleCounter, iter_source
from .tables import count_samples, is_table_file, table_format
from .tokenize import IGNORE_INDEX, render_sample

if TYPE_CHECKING:
    from ..processing import InterleafProcessor

__all__ = [
    "ShownSample",
    "SourceReport",
    "corpus_images_root",
    "guess_format",
    "inspect_source",
    "mixture_for_source",
    "shorten_image_runs",
    "source_size",
]

MAX_BAD_EXAMPLES = 10  # bad samples a report keeps (each one's where and why)


def guess_format(files: list[str]) -> str:
    """llava for JSON files (preference if the first entry has "chosen"); for tar shards,
    interleaved if the first sample's JSON has "texts"; for parquet / Arrow files, what their
    columns hold (:mod:`interleaf.data.tables`)."""
    if all(is_table_file(f) for f in files):
        try:
            return table_format(files[0])
        except BadSample as bad:
            raise InputError(f"cannot read {files[0]!r}: {bad.detail}; check the file, or pass another") from bad
    if all(f.endswith((".json", ".jsonl")) for f in files):
        try:
            first = next((r.data for r in load_llava(files[0]) if r.data is not None), None)
        except InputError:  # unreadable: reading it as a source reports why
            first = None
        return "preference" if isinstance(first, dict) and "chosen" in first else "llava"
    for f in files:
        for sample in iter_tar_groups(f):
            if isinstance(sample, TarSample):
                try:
                    meta = json.loads(sample.fields.get("json", b"{}"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
                return "interleaved" if isinstance(meta, dict) and "texts" in meta else "pairs"
    raise InputError(f"cannot guess the format of {files[:3]}: no readable sample; pass --format")


def corpus_images_root(llava_file: str) -> Path | None:
    """A LLaVA file of a corpus written by ``interleaf data synth`` has its images in the corpus's images/."""
    manifest = Path(llava_file).resolve().parent.parent / "corpus.json"
    try:
        return manifest.parent / read_json(manifest, "corpus manifest")["images_dir"]
    except (OSError, ValueError, KeyError, TypeError):  # not a synth corpus: no corpus.json, or another one
        return None


def mixture_for_source(source: str, fmt: str | None = None, images_root: Path | None = None) -> MixtureConfig:
    """The mixture ``source`` stands for: a mixture YAML as written, else one source of its files.

    ``source`` is a mixture YAML, a tar shard or a glob of shards, or a LLaVA JSON / JSON-lines
    file; ``fmt`` defaults to :func:`guess_format`, and a LLaVA file's ``images_root`` to a synth
    corpus's images/ when it is one.
    """
    if source.endswith((".yaml", ".yml")):
        return load_mixture(source)
    files = sorted(glob.glob(source)) if glob.has_magic(source) else [source] if Path(source).is_file() else []
    if not files:
        raise InputError(f"SOURCE {source!r} matches no file; pass a mixture YAML, a tar shard (or glob), a LLaVA JSON, or parquet files")
    fmt = fmt or guess_format(files)
    if fmt in ("llava", "preference") and images_root is None and not is_table_file(files[0]):
        images_root = corpus_images_root(files[0])
    return single_source_mixture(files, fmt, images_root=str(images_root) if images_root else None)


def source_size(cfg: SourceConfig, files: list[str] | None = None) -> int:
    """Samples in a source's files (LLaVA records, or tar samples); ``files`` defaults to ``cfg.files()``."""
    files = cfg.files() if files is None else files
    return sum(len(load_llava(f)) if cfg.format in ("llava", "preference") and not is_table_file(f)
               else count_samples(f) for f in files)


@dataclass(frozen=True)
class ShownSample:
    """One tokenised sample as text, its trained tokens wrapped in ``[[ ]]``."""

    key: str
    num_tokens: int  # positions of the row the LM sees (a grown image at its length, as training counts them)
    num_trained: int  # tokens with a label (the loss sees them)
    num_images: int
    rendered: str
    num_text_tokens: int | None = None  # the text's tokens, where fewer than num_tokens (placement replace)


@dataclass
class SourceReport:
    """What :func:`inspect_source` found in one source."""

    source: SourceConfig
    size: int  # samples in its files
    num_files: int
    shown: list[ShownSample] = field(default_factory=list)
    good: int = 0  # good samples among those scanned
    scanned: int = 0  # samples the counter has seen for this source's name
    bad: list[BadSample] = field(default_factory=list)  # the first MAX_BAD_EXAMPLES bad ones


def shorten_image_runs(text: str, image_token: str, per_image: int | Sequence[int]) -> str:
    """``text`` with each image written as ``per_image`` copies of ``image_token`` (LLaVA's
    placement: one per vision token) shown as ``<image>*N``; one token per image stays as it is.

    ``per_image`` is one count for every image, or each image's count in order (LLaVA-NeXT, where
    it follows the image's size): a run of image tokens is then split into the next counts."""
    token = re.escape(image_token)
    if isinstance(per_image, int):
        if per_image <= 1:
            return text
        return re.sub(f"(?:{token}){{{per_image}}}", f"{image_token}*{per_image}", text)
    queue = list(per_image)

    def split(run: re.Match) -> str:
        left, out = len(run.group(0)) // len(image_token), []
        while queue and 0 < queue[0] <= left:
            n = queue.pop(0)
            out.append(f"{image_token}*{n}" if n > 1 else image_token)
            left -= n
        return "".join(out) + image_token * left

    return re.sub(f"(?:{token})+", split, text)


def _shown(sample: dict, processor: InterleafProcessor) -> ShownSample:
    """One sample as text; a preference pair shows its chosen row, then its rejected row. An image
    written as one token per vision token is shown once with its count (:func:`shorten_image_runs`)."""
    rows = [("", sample)] if "input_ids" in sample else [(f"{k}: ", sample[k]) for k in ("chosen", "rejected")]
    fmt = processor.format

    def render(row: dict) -> str:
        text = render_sample(processor.tokenizer, row["input_ids"], row["labels"])
        if not fmt.is_llava:
            return text
        if fmt.sized_images:  # each image's count follows its size: (height, width) -> (width, height)
            counts = [fmt.image_token_count((w, h)) for h, w in row.get("image_sizes", [])]
            return shorten_image_runs(text, fmt.tokens.image_token, counts)
        return shorten_image_runs(text, fmt.tokens.image_token, fmt.image_token_count())

    text_tokens = sum(len(row["input_ids"]) for _, row in rows)
    lm_tokens = sum(row.get("lm_length", len(row["input_ids"])) for _, row in rows)
    return ShownSample(
        key=sample["key"],
        num_tokens=lm_tokens,
        num_trained=sum(1 for _, row in rows for label in row["labels"] if label != IGNORE_INDEX),
        num_images=len(rows[0][1]["images"]),
        rendered="\n".join(head + render(row) for head, row in rows),
        num_text_tokens=text_tokens if text_tokens != lm_tokens else None,
    )


def inspect_source(
    cfg: SourceConfig,
    processor: InterleafProcessor,
    *,
    counter: BadSampleCounter,
    max_length: int | None = None,
    show: int = 3,
    scan: int = 200,
) -> SourceReport:
    """Tokenise the first ``scan`` samples of ``cfg`` with ``processor``, keeping the first ``show``.

    Good and bad samples are added to ``counter`` (shared by a mixture's sources, so that its
    :meth:`~BadSampleCounter.summary` covers them all); ``max_length`` truncates as training does.
    """
    files = cfg.files()
    report = SourceReport(source=cfg, size=source_size(cfg, files), num_files=len(files))
    for i, (sample, bad) in enumerate(iter_source(cfg, processor, max_length=max_length)):
        if i >= scan:
            break
        if bad is not None:
            counter.add_bad(cfg.name, bad)
            if len(report.bad) < MAX_BAD_EXAMPLES:
                report.bad.append(bad)
            continue
        counter.add_good(cfg.name)
        report.good += 1
        if len(report.shown) < show:
            report.shown.append(_shown(sample, processor))
    report.scanned = counter.seen[cfg.name]
    return report
