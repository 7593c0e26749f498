"""Training data mixtures: which sources to read, how often, and with what loss weight.

A mixture is a YAML file (or a dict) read by :func:`load_mixture` into a typed, validated
:class:`MixtureConfig`; :class:`~interleaf.data.stream.MixtureStream` streams it. Every error
names the field, e.g. ``config field 'sources[1].samples': must be an integer >= 1, got -5``;
every section is read by :mod:`interleaf.schema`, the reader of every interleaf config.

Mixture YAML schema
-------------------

.. code-block:: yaml

    max_length: 256          # tokens per sample; longer samples are truncated (default: the LM's context)
    shuffle_buffer: 1000     # samples shuffled together when streaming tar shards
    seed: 0                  # the order is a pure function of the seed (and the epoch)
    max_bad_fraction: 0.1    # more bad samples than this share of a source (after 20) stops the run
    samples_per_epoch: null  # epoch length of a weighted mixture (default: the sources' total size)
    sources:
      - name: laion                     # unique; used in logs and the bad-sample table
        format: pairs                   # pairs | interleaved | llava | preference
        paths: [pairs/train-*.tar]      # files or globs, relative to this YAML's folder; $VARS expand
                                        # (a path that starts with $VAR is relative to the working directory)
        weight: 1.0                     # sampling weight ...
        loss_weight: 0.2                # ... a loss multiplier (OpenFlamingo trains pairs x 0.2)
        task_prompt: null               # untrained text after the image (InfiMM multi-task)
        max_images: 6                   # samples with more images are skipped ("too_many_images")
      - name: vqa
        format: llava
        paths: llava/vqa_train.json     # a JSON list or JSON lines
        images_root: images             # LLaVA (and preference) image paths are relative to this folder
        image_path_map: {"/data/coco/": "coco/"}   # prefix -> replacement (xGen-MM)
        samples: 50000                  # ... or an absolute count per epoch (more than the source's
                                        # size repeats it, fewer takes part of it; xGen-MM's SFT YAML)

Parquet and Arrow files (Hugging Face datasets: llava-instruct-mix-vsft, the_cauldron, OBELICS,
RLAIF-V) are sources too: paths ending in ``.parquet`` / ``.arrow``, ``format`` the kind of rows
they hold, ``images_root`` / ``image_path_map`` for images given as paths (any format); see
:mod:`interleaf.data.tables` for their columns::

      - name: vsft
        format: llava
        paths: llava-instruct-mix-vsft/data/train-*.parquet

Every source gives either ``samples`` (all of them) or ``weight`` (default 1 each). With counts an
epoch holds exactly those counts, in a shuffled order; with weights each sample's source is
drawn by weight. A source that is used up starts a new, re-shuffled pass over itself.

The formats (ten lines each)
----------------------------

Image-text pairs, ``format: pairs`` (WebDataset tar shards, as LAION / COYO ship)::

    train-000000.tar
      000000001.jpg          the image (jpg, jpeg, png or webp)
      000000001.txt          the caption ...
      000000001.json         ... or {"caption": "a red circle."} (also "text")
      000000002.png
      000000002.txt
    Trained, "openflamingo" format: <s><image>[a red circle.<|endofchunk|></s>]
    Trained, "idefics" format:      <s><fake><image><fake>[a red circle.</s>]
    With task_prompt "Describe the image.": <s><image>Describe the image.[ a red circle.<|endofchunk|></s>]

Interleaved documents, ``format: interleaved`` (OBELICS-style WebDataset shards)::

    train-000000.tar
      doc-000001.json        {"texts": ["An intro.", null, "A red circle.", null, "A square."],
                              "images": [null, "doc-000001.0.png", null, "doc-000001.1.png", null]}
      doc-000001.0.png       images named by member (or given inline as base64 / data URLs)
      doc-000001.1.png
    Texts and images are aligned lists; at each position exactly one is non-null.
    Trained (MMC4 rule): <s>An intro.<image>[A red circle.<|endofchunk|>]<image>[A square.<|endofchunk|>]</s>
    Text before the first image, and after an <|endofchunk|> until the next image, is not trained.

LLaVA conversations, ``format: llava`` (a JSON list, or one object per line)::

    [{"id": "0001", "image": "train/s0123.png",
      "conversations": [
        {"from": "human", "value": "<image>\\nwhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many objects are there?"},
        {"from": "gpt", "value": "two"}]},
     {"id": "0002", "image": ["a.png", "b.png"], "conversations": [... two <image> placeholders ...]},
     {"id": "0003", "conversations": [... text only, no "image" ...]}]
    Rendered with the chat template; trained: the assistant turns only, never image tokens.

Preference pairs for DPO, ``format: preference`` (a JSON list, or one object per line; the LLaVA
conventions for images; see :mod:`interleaf.data.preference`)::

    [{"id": "0001", "image": "train/s0123.png",
      "prompt": "<image>\\nwhat colour is the circle?",      # or a list of turns ending with the user's
      "chosen": "red",
      "rejected": "blue"}]
    Each sample is two rows, prompt + chosen and prompt + rejected; scored: the answer only.
    Only a DPO stage (objective: dpo) reads them, and a DPO stage reads nothing else.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from ..files import read_yaml, user_path
from ..schema import join, read, setting
from .formats import FORMATS, TABLE_EXTENSIONS


@dataclass
class SourceConfig:
    """One data source of a mixture (see the module docstring for each field)."""

    name: str = setting(nonempty=True)
    format: Literal[FORMATS] = setting()
    paths: str | list[str] = setting(nonempty=True)  # one path or a list; absolute paths or globs once loaded
    images_root: str | None = None  # llava: folder the image paths are relative to
    image_path_map: dict[str, str] = field(default_factory=dict)  # llava: path prefix -> replacement
    samples: int | None = setting(None, ge=1)  # an absolute count per epoch ...
    weight: float | None = setting(None, gt=0)  # ... or a sampling weight
    loss_weight: float = setting(1.0, ge=0)  # multiplies this source's loss
    task_prompt: str | None = None  # untrained instruction (InfiMM multi-task)
    max_images: int = setting(6, ge=1)  # more images: a bad sample ("too_many_images")
    where: str = setting("sources[0]", internal=True)  # the field path, for error messages

    def _check(self, path: str) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        for i, p in enumerate(self.paths):
            if not p:
                raise ConfigError(join(join(path, "paths"), i), "must not be empty", "give a file path or a glob")
        tables = [p.endswith(TABLE_EXTENSIONS) for p in self.paths]
        if any(tables) and not all(tables):
            raise ConfigError(join(join(path, "paths"), tables.index(not tables[0])),
                              "mixes parquet / Arrow files with other files",
                              "give the parquet / Arrow files a source of their own")
        if self.format not in ("llava", "preference") and not all(tables):
            for key in ("images_root", "image_path_map"):
                if getattr(self, key):
                    raise ConfigError(join(path, key), f"applies to llava and preference sources (and parquet files) only; {self.format} shards hold their images")
        if self.samples is not None and self.weight is not None:
            raise ConfigError(join(path, "samples"), "give either samples (a count per epoch) or weight, not both")
        if self.task_prompt and self.format == "interleaved":
            raise ConfigError(join(path, "task_prompt"), "applies to pairs and llava sources, not interleaved documents")
        self.task_prompt = self.task_prompt or None

    def files(self) -> list[str]:
        """The files of this source, globs expanded (sorted); a pattern that matches nothing is an error."""
        out: list[str] = []
        for i, pattern in enumerate(self.paths):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern, recursive=True))
            else:
                matches = [pattern] if Path(pattern).is_file() else []
            if not matches:
                raise ConfigError(
                    f"{self.where}.paths[{i}]", f"{pattern!r} matches no file",
                    "paths are relative to the mixture YAML's folder; check the path or write the data first",
                )
            out += matches
        return out


@dataclass
class MixtureConfig:
    """A validated mixture: its sources and the global streaming settings."""

    sources: list[SourceConfig] = setting(nonempty=True)
    max_length: int | None = setting(None, ge=1)  # None: the processor's max_length (the LM's context)
    shuffle_buffer: int = setting(1000, ge=1)
    seed: int = setting(0, ge=0)
    max_bad_fraction: float = setting(0.1, ge=0, le=1)
    samples_per_epoch: int | None = setting(None, ge=1)  # weighted mixtures: the epoch length
    base_dir: str = setting(".", internal=True)

    def _check(self, path: str) -> None:
        names = [s.name for s in self.sources]
        for i, s in enumerate(self.sources):
            if names.index(s.name) != i:
                raise ConfigError(join(join(path, "sources"), i) + ".name",
                                  f"{s.name!r} is used by sources[{names.index(s.name)}] too; names must be unique")
        with_counts = [s.samples is not None for s in self.sources]
        if any(with_counts) and not all(with_counts):
            i = with_counts.index(False)
            raise ConfigError(
                join(join(path, "sources"), i) + ".samples", "is missing while other sources give samples",
                "give every source a count per epoch (samples), or give weights only",
            )
        if not any(with_counts):
            for s in self.sources:
                s.weight = 1.0 if s.weight is None else s.weight
        elif self.samples_per_epoch is not None:
            raise ConfigError(join(path, "samples_per_epoch"),
                              "applies to weighted mixtures; with counts the epoch is their sum")

    @property
    def uses_counts(self) -> bool:
        return self.sources[0].samples is not None

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def _from_env(path: str, base: Path) -> Path:
    """The folder a relative path is read from: the YAML's folder, or the working directory for a
    path that starts with ``$VAR`` (the user's value given at run time, e.g. ``OBELICS_DIR=data/obelics``;
    a packaged recipe's folder is inside the installed package)."""
    return Path.cwd() if path.lstrip().startswith("$") else base


def _expand(path: str, field: str) -> str:
    """``$VAR`` / ``${VAR}`` in a path come from the environment; an unset one is an error."""
    expanded = os.path.expandvars(path)
    missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if missing:
        raise ConfigError(field, f"environment variable ${missing[0]} in {path!r} is not set", f"export {missing[0]}=...")
    return expanded


def _resolve(path: str, base: Path, field: str) -> str:
    """A path of the YAML made absolute: ``$VARS`` expanded, relative to ``base`` (see :func:`_from_env`)."""
    return str(_from_env(path, base) / user_path(_expand(path, field), field))


def load_mixture(
    source: str | Path | dict | MixtureConfig, *, base_dir: str | Path | None = None, check_files: bool = True
) -> MixtureConfig:
    """Read and validate a mixture from a YAML path or a dict.

    Relative paths are resolved against the YAML's folder (a dict: ``base_dir``, default the
    current folder). ``check_files`` also checks that every path or glob matches a file.
    """
    if isinstance(source, MixtureConfig):
        return source
    if isinstance(source, (str, Path)):
        path = user_path(source, "mixture")
        data = read_yaml(path, "mixture", "pass the path of a mixture YAML")
        base = Path(base_dir) if base_dir is not None else path.parent
    else:
        data, base = source, Path(base_dir) if base_dir is not None else Path.cwd()
    base = base.resolve()
    mixture = read(MixtureConfig, data, name="mixture")
    mixture.base_dir = str(base)
    for i, s in enumerate(mixture.sources):
        s.where = f"sources[{i}]"
        s.paths = [_resolve(p, base, f"{s.where}.paths") for p in s.paths]
        if s.images_root is not None:
            s.images_root = _resolve(s.images_root, base, f"{s.where}.images_root")
    if check_files:
        for s in mixture.sources:
            s.files()
    return mixture


def single_source_mixture(
    paths: list[str] | str, fmt: str, *, images_root: str | None = None, **settings: Any
) -> MixtureConfig:
    """A one-source mixture (for ``interleaf data inspect`` on a shard or a LLaVA file)."""
    source = {"name": fmt, "format": fmt, "paths": paths}
    if images_root is not None:
        source["images_root"] = str(Path(images_root).resolve())
    paths = [paths] if isinstance(paths, str) else paths
    source["paths"] = [str(Path(p).expanduser().resolve()) for p in paths]
    return load_mixture({"sources": [source], **settings})


__all__ = ["MixtureConfig", "SourceConfig", "load_mixture", "single_source_mixture"]
