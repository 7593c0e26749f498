"""Training data mixtures: which sources to read, how often, and with what loss weight.

A mixture is a YAML file (or a dict) read by :func:`load_mixture` into a typed, validated
:class:`MixtureConfig`; :class:`~interleaf.data.stream.MixtureStream` streams it. Every error
names the field, e.g. ``config field 'sources[1].samples': must be a positive integer, got -5``.

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
        format: pairs                   # pairs | interleaved | llava
        paths: [pairs/train-*.tar]      # files or globs, relative to this YAML's folder; $VARS expand
                                        # (a path that starts with $VAR is relative to the working directory)
        weight: 1.0                     # sampling weight ...
        loss_weight: 0.2                # ... a loss multiplier (OpenFlamingo trains pairs x 0.2)
        task_prompt: null               # untrained text after the image (InfiMM multi-task)
        max_images: 6                   # samples with more images are skipped ("too_many_images")
      - name: vqa
        format: llava
        paths: llava/vqa_train.json     # a JSON list or JSON lines
        images_root: images             # LLaVA image paths are relative to this folder
        image_path_map: {"/data/coco/": "coco/"}   # prefix -> replacement (xGen-MM)
        samples: 50000                  # ... or an absolute count per epoch (more than the source's
                                        # size repeats it, fewer takes part of it; xGen-MM's SFT YAML)

Every source gives either ``samples`` (all of them) or ``weight`` (default 1 each). With counts an
epoch holds exactly those counts, in a shuffled order; with weights each sample's source is
drawn by weight. A source that is used up starts a new, re-shuffled pass over itself.

The three formats (ten lines each)
----------------------------------

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
"""

from __future__ import annotations

import glob
import os
import re
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..config import read_yaml_file, user_path
from ..errors import ConfigError
from .formats import FORMATS

_SOURCE_FIELDS = (
    "name", "format", "paths", "images_root", "image_path_map", "samples", "weight", "loss_weight",
    "task_prompt", "max_images",
)
_MIXTURE_FIELDS = ("sources", "max_length", "shuffle_buffer", "seed", "max_bad_fraction", "samples_per_epoch")


def _positive_int(value: Any, where: str, allow_none: bool = False, allow_zero: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(where, f"must be an integer >= {low}, got {value!r}")
    return value


def _number(value: Any, where: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ConfigError(where, f"must be {bounds}, got {value!r}")
    return float(value)


@dataclass
class SourceConfig:
    """One data source of a mixture (see the module docstring for each field)."""

    name: str
    format: str  # pairs | interleaved | llava
    paths: list[str]  # absolute file paths or globs
    images_root: str | None = None  # llava: folder the image paths are relative to
    image_path_map: dict[str, str] = field(default_factory=dict)  # llava: path prefix -> replacement
    samples: int | None = None  # an absolute count per epoch ...
    weight: float | None = None  # ... or a sampling weight
    loss_weight: float = 1.0  # multiplies this source's loss
    task_prompt: str | None = None  # untrained instruction (InfiMM multi-task)
    max_images: int = 6  # more images: a bad sample ("too_many_images")
    where: str = "sources[0]"  # the field path, for error messages

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

    sources: list[SourceConfig]
    max_length: int | None = None  # None: the processor's max_length (the LM's context)
    shuffle_buffer: int = 1000
    seed: int = 0
    max_bad_fraction: float = 0.1
    samples_per_epoch: int | None = None  # weighted mixtures: the epoch length
    base_dir: str = "."

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


def _parse_source(data: Any, i: int, base: Path) -> SourceConfig:
    where = f"sources[{i}]"
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a mapping with name, format and paths, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SOURCE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown field", f"known fields: {', '.join(_SOURCE_FIELDS)}")
    for required in ("name", "format", "paths"):
        if data.get(required) in (None, "", []):
            raise ConfigError(f"{where}.{required}", "is required")
    name = data["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name", f"must be a string, got {name!r}")
    fmt = data["format"]
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format", f"must be one of {list(FORMATS)}, got {fmt!r}")
    paths = data["paths"]
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where}.paths", f"must be a path or a list of paths (strings), got {paths!r}")
    paths = [str(_from_env(p, base) / user_path(_expand(p, f"{where}.paths"), f"{where}.paths")) for p in paths]
    images_root = data.get("images_root")
    path_map = data.get("image_path_map") or {}
    if fmt != "llava":
        for key in ("images_root", "image_path_map"):
            if data.get(key):
                raise ConfigError(f"{where}.{key}", f"applies to llava sources only; {fmt} shards hold their images")
    if images_root is not None:
        if not isinstance(images_root, str):
            raise ConfigError(f"{where}.images_root", f"must be a folder path, got {images_root!r}")
        images_root = str(_from_env(images_root, base) / user_path(_expand(images_root, f"{where}.images_root"), f"{where}.images_root"))
    if not isinstance(path_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in path_map.items()):
        raise ConfigError(f"{where}.image_path_map", f"must map path prefixes to replacements (strings), got {path_map!r}")
    samples, weight = data.get("samples"), data.get("weight")
    if samples is not None and weight is not None:
        raise ConfigError(f"{where}.samples", "give either samples (a count per epoch) or weight, not both")
    samples = _positive_int(samples, f"{where}.samples", allow_none=True)
    if weight is not None:
        weight = _number(weight, f"{where}.weight", 0.0, low_open=True)
    task_prompt = data.get("task_prompt")
    if task_prompt is not None and not isinstance(task_prompt, str):
        raise ConfigError(f"{where}.task_prompt", f"must be a string, got {task_prompt!r}")
    if task_prompt and fmt == "interleaved":
        raise ConfigError(f"{where}.task_prompt", "applies to pairs and llava sources, not interleaved documents")
    return SourceConfig(
        name=name,
        format=fmt,
        paths=paths,
        images_root=images_root,
        image_path_map=dict(path_map),
        samples=samples,
        weight=weight,
        loss_weight=_number(data.get("loss_weight", 1.0), f"{where}.loss_weight", 0.0),
        task_prompt=task_prompt or None,
        max_images=_positive_int(data.get("max_images", 6), f"{where}.max_images"),
        where=where,
    )


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
        data = read_yaml_file(path, "mixture", "pass the path of a mixture YAML")
        base = Path(base_dir) if base_dir is not None else path.parent
    else:
        data, base = source, Path(base_dir) if base_dir is not None else Path.cwd()
    base = base.resolve()
    if not isinstance(data, dict):
        raise ConfigError("mixture", f"must be a mapping with a 'sources' list, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_MIXTURE_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], "unknown mixture field", f"known fields: {', '.join(_MIXTURE_FIELDS)}")
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError("sources", "must be a non-empty list of sources (name, format, paths, ...)")
    sources = [_parse_source(s, i, base) for i, s in enumerate(raw_sources)]
    names = [s.name for s in sources]
    for i, s in enumerate(sources):
        if names.index(s.name) != i:
            raise ConfigError(f"sources[{i}].name", f"{s.name!r} is used by sources[{names.index(s.name)}] too; names must be unique")
    with_counts = [s.samples is not None for s in sources]
    if any(with_counts) and not all(with_counts):
        i = with_counts.index(False)
        raise ConfigError(
            f"sources[{i}].samples", "is missing while other sources give samples",
            "give every source a count per epoch (samples), or give weights only",
        )
    if not any(with_counts):
        for s in sources:
            s.weight = 1.0 if s.weight is None else s.weight
    mixture = MixtureConfig(
        sources=sources,
        max_length=_positive_int(data.get("max_length"), "max_length", allow_none=True),
        shuffle_buffer=_positive_int(data.get("shuffle_buffer", 1000), "shuffle_buffer"),
        seed=_positive_int(data.get("seed", 0), "seed", allow_zero=True),
        max_bad_fraction=_number(data.get("max_bad_fraction", 0.1), "max_bad_fraction", 0.0, 1.0),
        samples_per_epoch=_positive_int(data.get("samples_per_epoch"), "samples_per_epoch", allow_none=True),
        base_dir=str(base),
    )
    if mixture.samples_per_epoch is not None and any(with_counts):
        raise ConfigError("samples_per_epoch", "applies to weighted mixtures; with counts the epoch is their sum")
    if check_files:
        for s in sources:
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
