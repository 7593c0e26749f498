"""Typed, validated training configs: one stage, or a recipe of stages, from YAML or a dict.

A stage YAML::

    name: pretrain
    model: {preset: tiny-random}      # or {path: runs/x/final}, {from_stage: pretrain},
                                      # or build options {vision: DIR, lm: DIR, tokenizer: DIR, resampler: {...}, ...}
    data: data/mix.yaml               # a mixture YAML (relative to this file) or an inline mixture
    freeze: flamingo                  # flamingo | unfreeze_lm | all_trainable (default: the model's own)
    optim: {lr: 1e-4, weight_decay: 0.1, betas: [0.9, 0.999], eps: 1e-8, schedule: cosine,
            warmup_steps: 100, min_lr_ratio: 0.0, clip_grad_norm: 1.0}
    batch_size: 8                     # samples per optimiser step, over all processes and accumulation
    grad_accum: 1
    max_steps: 1000
    max_length: 256                   # tokens per sample (default: the mixture's, else the LM's context)
    z_loss: 0.0
    precision: fp32                   # fp32 | bf16 (autocast)
    gradient_checkpointing: false
    checkpoint: {every: 500, keep_last: 2}   # keep_last >= 2 leaves a fallback if the newest is damaged
    max_nonfinite_steps: 3            # steps with a NaN/inf loss are skipped; this many in a row stop the run
    log_every: 10
    seed: 0
    out: runs/name
    distributed: {strategy: ddp}      # ddp | fsdp (used when launched by torchrun with > 1 process)

A recipe lists stages (``stages: [...]``); its other top-level keys are defaults for every stage,
a stage without ``out`` writes to ``{recipe out}/{stage name}``, and ``model: {from_stage: NAME}``
starts a stage from an earlier stage's final model.

Relative paths: ``data`` (a mixture file, or the paths inside an inline mixture) is relative to
the config file's folder; ``out`` and ``model`` directories are relative to the working folder.
Every error is a :class:`~interleaf.errors.ConfigError` naming the dotted field and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import FREEZE_POLICIES, read_yaml_file, user_path
from ..errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_BUILD_OPTIONS = ("vision", "lm", "tokenizer", "resampler", "cross_attention", "tokens")


class _Where:
    """Prefixes field names with the stage and suffixes errors with the file."""

    def __init__(self, prefix: str = "", file: str | None = None):
        self.prefix, self.file = prefix, file

    def error(self, name: str, problem: str, fix: str | None = None) -> ConfigError:
        where = f" (in {self.file})" if self.file else ""
        err = ConfigError(f"{self.prefix}{name}", problem + where, fix)
        return err


def _unknown(data: dict, known: tuple[str, ...] | set[str], where: _Where, section: str = "") -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise where.error(f"{section}{unknown[0]}", "unknown field", f"known fields: {', '.join(sorted(known))}")


def _int(value: Any, name: str, where: _Where, low: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise where.error(name, f"must be an integer >= {low}, got {value!r}")
    return int(value)


def _float(value: Any, name: str, where: _Where, low: float = 0.0, high: float = math.inf, open_low: bool = False) -> float:
    if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise where.error(name, f"must be a number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
        raise where.error(name, f"must be {bound}, got {value!r}")
    return float(value)


def _choice(value: Any, name: str, choices: tuple, where: _Where) -> Any:
    if value not in choices:
        raise where.error(name, f"must be one of {list(choices)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- sections


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # constant | linear | cosine, after a linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule's floor, as a share of lr
    clip_grad_norm: float | None = 1.0  # None: no clipping

    @classmethod
    def parse(cls, data: Any, where: _Where) -> "OptimConfig":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise where.error("optim", f"must be a mapping, got {type(data).__name__}")
        _unknown(data, {f.name for f in dataclasses.fields(cls)}, where, "optim.")
        d = {**dataclasses.asdict(cls()), **data}
        betas = d["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise where.error("optim.betas", f"must be two numbers [beta1, beta2], got {betas!r}")
        betas = tuple(_float(b, f"optim.betas[{i}]", where, 0.0, 1.0) for i, b in enumerate(betas))
        clip = d["clip_grad_norm"]
        return cls(
            lr=_float(d["lr"], "optim.lr", where, 0.0, open_low=True),
            weight_decay=_float(d["weight_decay"], "optim.weight_decay", where),
            betas=betas,  # type: ignore[arg-type]
            eps=_float(d["eps"], "optim.eps", where, 0.0, open_low=True),
            schedule=_choice(d["schedule"], "optim.schedule", SCHEDULES, where),
            warmup_steps=_int(d["warmup_steps"], "optim.warmup_steps", where, low=0),  # type: ignore[arg-type]
            min_lr_ratio=_float(d["min_lr_ratio"], "optim.min_lr_ratio", where, 0.0, 1.0),
            clip_grad_norm=None if clip is None else _float(clip, "optim.clip_grad_norm", where, 0.0, open_low=True),
        )


@dataclass
class CheckpointConfig:
    every: int | None = None  # steps between checkpoints; None: only the final model
    # Complete checkpoints kept on disk. With 2 or more, a newest one found damaged at resume has a
    # predecessor to fall back to; with 1 there is none and resuming stops with an error.
    keep_last: int = 2

    @classmethod
    def parse(cls, data: Any, where: _Where) -> "CheckpointConfig":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise where.error("checkpoint", f"must be a mapping like {{every: 500, keep_last: 2}}, got {data!r}")
        _unknown(data, ("every", "keep_last"), where, "checkpoint.")
        return cls(
            every=_int(data.get("every"), "checkpoint.every", where, allow_none=True),
            keep_last=_int(data.get("keep_last", 2), "checkpoint.keep_last", where),  # type: ignore[arg-type]
        )


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp; applies when torchrun starts more than one process

    @classmethod
    def parse(cls, data: Any, where: _Where) -> "DistributedConfig":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise where.error("distributed", f"must be a mapping like {{strategy: ddp}}, got {data!r}")
        _unknown(data, ("strategy",), where, "distributed.")
        return cls(strategy=_choice(data.get("strategy", "ddp"), "distributed.strategy", STRATEGIES, where))


@dataclass
class ModelSpec:
    """Where a stage's model comes from: exactly one of a preset (+ build options), build options, a
    ``save_pretrained`` directory, or an earlier stage's final model."""

    preset: str | None = None
    path: str | None = None
    from_stage: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # interleaf.build keyword arguments

    @classmethod
    def parse(cls, data: Any, where: _Where) -> "ModelSpec":
        if isinstance(data, str):  # shorthand: a preset name or a directory
            data = {"path": data} if ("/" in data or user_path(data, "model").is_dir()) else {"preset": data}
        if not isinstance(data, dict) or not data:
            raise where.error(
                "model", f"must be a mapping, got {data!r}",
                "e.g. {preset: tiny-random}, {path: runs/x/final}, {from_stage: pretrain} or {vision: DIR, lm: DIR}",
            )
        _unknown(data, ("preset", "path", "from_stage", *_BUILD_OPTIONS), where, "model.")
        options = {k: v for k, v in data.items() if k in _BUILD_OPTIONS}
        origins = [k for k in ("path", "from_stage") if data.get(k) is not None]
        if data.get("preset") is not None or options:
            origins.append("preset" if data.get("preset") is not None else "build options")
        if len(origins) != 1:
            raise where.error(
                "model", f"give exactly one origin of the model, got {origins or 'none'}",
                "preset (with optional build options), build options (vision, lm, ...), path, or from_stage",
            )
        for key in ("preset", "path", "from_stage"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise where.error(f"model.{key}", f"must be a string, got {data[key]!r}")
        if data.get("path") is not None and options:
            raise where.error("model.path", "a saved model is loaded as it is; build options apply to preset/vision/lm only")
        from ..data.mixture import _expand

        # $VARS in local paths come from the environment, as in mixtures
        options = {k: _expand(v, f"model.{k}") if isinstance(v, str) and k in ("vision", "lm", "tokenizer") else v
                   for k, v in options.items()}
        path = _expand(data["path"], "model.path") if data.get("path") is not None else None
        return cls(preset=data.get("preset"), path=path, from_stage=data.get("from_stage"), options=options)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("preset", "path", "from_stage") if getattr(self, k) is not None}
        return {**d, **self.options}


@dataclass
class StageConfig:
    """One training stage (see the module docstring)."""

    name: str = "train"
    model: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny-random"))
    data: str | dict | None = None  # a mixture YAML path (absolute after loading) or an inline mixture
    freeze: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    max_length: int | None = None
    z_loss: float = 0.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A step whose loss or gradient norm is NaN or infinite (summed over every process) is skipped:
    # no optimiser update, gradients dropped, counted in summary.json. This many in a row stop the run.
    max_nonfinite_steps: int = 3
    log_every: int = 10
    seed: int = 0
    out: str = "runs/train"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    base_dir: str = "."  # the config file's folder: relative data paths resolve against it
    source: str | None = None  # the file this stage came from (for error messages)

    def to_dict(self) -> dict:
        """A plain dict that :func:`parse_stage` reads back (saved next to checkpoints)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["optim"]["betas"] = list(self.optim.betas)
        for key in ("base_dir", "source"):
            d.pop(key)
        return d

    def mixture(self, *, check_files: bool = True):
        """The stage's validated :class:`~interleaf.data.mixture.MixtureConfig`."""
        from ..data.mixture import load_mixture

        if self.data is None:
            raise ConfigError(
                "data", f"stage {self.name!r} has no data",
                "set data: to a mixture YAML or an inline mixture, or pass --data my.json --images my_images/",
            )
        try:
            if isinstance(self.data, dict):
                mixture = load_mixture(self.data, base_dir=self.base_dir, check_files=check_files)
            else:
                mixture = load_mixture(self.data, check_files=check_files)
        except ConfigError as e:
            where = f" (in {self.source})" if self.source else ""
            raise ConfigError(f"data.{e.field}", str(e).split(": ", 1)[-1] + where) from e
        if self.max_length is not None:
            mixture = dataclasses.replace(mixture, max_length=self.max_length)
        return mixture


_STAGE_FIELDS = tuple(f.name for f in dataclasses.fields(StageConfig) if f.name not in ("base_dir", "source"))


def parse_stage(data: Any, *, base_dir: str | Path = ".", source: str | None = None, prefix: str = "") -> StageConfig:
    """Validate a stage dict into a :class:`StageConfig`; errors name ``prefix + field`` and ``source``."""
    where = _Where(prefix, source)
    if not isinstance(data, dict):
        raise where.error("", f"a stage must be a mapping, got {type(data).__name__}")
    _unknown(data, _STAGE_FIELDS, where)
    d = dict(data)
    name = d.get("name", "train")
    if not isinstance(name, str) or not name or "/" in name:
        raise where.error("name", f"must be a non-empty string without '/', got {name!r}")
    base = Path(base_dir).expanduser().resolve()
    mixture = d.get("data")
    if isinstance(mixture, str):
        mixture = str(base / user_path(mixture, f"{prefix}data"))
    elif mixture is not None and not isinstance(mixture, dict):
        raise where.error("data", f"must be a mixture YAML path or an inline mixture (a mapping), got {mixture!r}")
    freeze = d.get("freeze")
    if freeze is not None:
        _choice(freeze, "freeze", FREEZE_POLICIES, where)
    out = d.get("out", f"runs/{name}")
    if not isinstance(out, str) or not out:
        raise where.error("out", f"must be a folder path, got {out!r}")
    gc = d.get("gradient_checkpointing", False)
    if not isinstance(gc, bool):
        raise where.error("gradient_checkpointing", f"must be true or false, got {gc!r}")
    stage = StageConfig(
        name=name,
        model=ModelSpec.parse(d.get("model", {"preset": "tiny-random"}), where),
        data=mixture,
        freeze=freeze,
        optim=OptimConfig.parse(d.get("optim"), where),
        batch_size=_int(d.get("batch_size", 8), "batch_size", where),  # type: ignore[arg-type]
        grad_accum=_int(d.get("grad_accum", 1), "grad_accum", where),  # type: ignore[arg-type]
        max_steps=_int(d.get("max_steps", 1000), "max_steps", where),  # type: ignore[arg-type]
        max_length=_int(d.get("max_length"), "max_length", where, low=2, allow_none=True),
        z_loss=_float(d.get("z_loss", 0.0), "z_loss", where),
        precision=_choice(d.get("precision", "fp32"), "precision", PRECISIONS, where),
        gradient_checkpointing=gc,
        checkpoint=CheckpointConfig.parse(d.get("checkpoint"), where),
        max_nonfinite_steps=_int(d.get("max_nonfinite_steps", 3), "max_nonfinite_steps", where),  # type: ignore[arg-type]
        log_every=_int(d.get("log_every", 10), "log_every", where),  # type: ignore[arg-type]
        seed=_int(d.get("seed", 0), "seed", where, low=0),  # type: ignore[arg-type]
        out=out,
        distributed=DistributedConfig.parse(d.get("distributed"), where),
        base_dir=str(base),
        source=source,
    )
    if stage.batch_size % stage.grad_accum:
        raise where.error(
            "grad_accum", f"{stage.grad_accum} does not divide batch_size {stage.batch_size}",
            "batch_size is the samples per optimiser step over all processes and accumulation steps",
        )
    return stage


# --------------------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """Stages run in order; a stage may start from an earlier one's final model (``from_stage``)."""

    stages: list[StageConfig]
    source: str | None = None

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, ".".join(parts[: i + 1]))]
            if not isinstance(node, (dict, list)):
                raise ConfigError(
                    ".".join(parts[: i + 1]), f"is {node!r}, not a section, so override {key!r} cannot set inside it"
                )
            continue
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], (dict, list)):
            raise ConfigError(
                ".".join(parts[: i + 1]), f"is {node[part]!r}, not a section, so override {key!r} cannot set inside it"
            )
        node = node[part]
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = value
    else:
        node[parts[-1]] = value


def _list_index(items: list, part: str, where: str) -> int:
    """A list entry by index, or (stages) by name."""
    if part.lstrip("-").isdigit() and -len(items) <= int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(where, f"no list entry {part!r} (give an index below {len(items)} or a stage name)")


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.sub=value", "e.g. optim.lr=3e-4 max_steps=200")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(text, "the key of an override must be a dotted field name, e.g. optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot read the override value {raw!r} as YAML ({e})") from e
    if isinstance(value, str) and _NUMBER.match(value.strip()):  # "1e-4" is a string in YAML 1.1
        value = float(value)
    return key, value


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any] | None) -> dict:
    """A copy of ``data`` with dotted overrides applied.

    For a recipe, ``stages.NAME.key=v`` (or ``stages.0.key=v``) sets one stage; any other key
    sets every stage (and the recipe's defaults).
    """
    data = copy.deepcopy(data)
    items = list(overrides.items()) if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        if "stages" in data and isinstance(data["stages"], list) and not key.startswith("stages."):
            _set_dotted(data, key, copy.deepcopy(value))
            for stage in data["stages"]:
                if isinstance(stage, dict):
                    _set_dotted(stage, key, copy.deepcopy(value))
        else:
            _set_dotted(data, key, value)
    return data


def read_yaml(path: str | Path) -> dict:
    p = user_path(path, "config")
    data = read_yaml_file(p, "config", "pass the path of a training YAML, or a packaged recipe's name such as pretrain")
    if not isinstance(data, dict):
        raise ConfigError("config", f"{str(p)!r} must hold a mapping (a stage, or stages: [...]), got {type(data).__name__}")
    return data


def load_recipe(
    config: str | Path | dict | StageConfig | Recipe,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    base_dir: str | Path | None = None,
) -> Recipe:
    """Read a stage or recipe (YAML path, packaged recipe name or dict), apply dotted overrides, validate every stage.

    A string or path that is not an existing file is looked up among the packaged recipes
    (:func:`interleaf.recipes.resolve`: ``"sft_llava"``, ``"seeds/idefics"``).
    """
    if isinstance(config, Recipe):
        return config
    if isinstance(config, StageConfig):
        return Recipe([config])
    source = None
    if isinstance(config, (str, Path)):
        from ..recipes import resolve

        config = resolve(config)
        source = str(config)
        data = read_yaml(config)
        base = Path(base_dir) if base_dir is not None else config.parent
    elif isinstance(config, dict):
        data, base = config, Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        raise ConfigError("config", f"must be a YAML path or a dict, got {type(config).__name__}")
    data = apply_overrides(data, overrides)
    if "stages" not in data:
        return Recipe([parse_stage(data, base_dir=base, source=source)], source=source)
    where = _Where("", source)
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise where.error("stages", "must be a non-empty list of stages")
    defaults = {k: v for k, v in data.items() if k != "stages"}
    _unknown(defaults, _STAGE_FIELDS, where)
    root_out = defaults.pop("out", None)
    if root_out is not None and (not isinstance(root_out, str) or not root_out):
        raise where.error("out", f"must be a folder path, got {root_out!r}")
    defaults.pop("name", None)
    stages: list[StageConfig] = []
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, dict):
            raise where.error(f"stages[{i}]", f"must be a mapping, got {type(raw).__name__}")
        merged = _deep_merge(defaults, raw)
        merged.setdefault("name", f"stage{i}")
        if "out" not in raw and root_out is not None:
            merged["out"] = str(Path(root_out) / merged["name"])
        stage = parse_stage(merged, base_dir=base, source=source, prefix=f"stages[{i}].")
        if stage.model.from_stage is not None and stage.model.from_stage not in [s.name for s in stages]:
            raise where.error(
                f"stages[{i}].model.from_stage",
                f"{stage.model.from_stage!r} is not an earlier stage (earlier: {[s.name for s in stages] or 'none'})",
            )
        if stage.name in [s.name for s in stages]:
            raise where.error(f"stages[{i}].name", f"{stage.name!r} is used twice; stage names must be unique")
        stages.append(stage)
    if stages[0].model.from_stage is not None:
        raise where.error("stages[0].model.from_stage", "the first stage has no earlier stage to start from")
    return Recipe(stages, source=source)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def llava_mixture(json_path: str | Path, images: str | Path | None = None) -> dict:
    """An inline one-source mixture for a user's LLaVA-format JSON (absolute paths)."""
    src: dict[str, Any] = {"name": "llava", "format": "llava", "paths": [str(Path(json_path).expanduser().resolve())]}
    if images is not None:
        src["images_root"] = str(Path(images).expanduser().resolve())
    return {"sources": [src]}


__all__ = [
    "CheckpointConfig", "DistributedConfig", "ModelSpec", "OptimConfig", "Recipe", "StageConfig",
    "apply_overrides", "llava_mixture", "load_recipe", "parse_override", "parse_stage",
]
