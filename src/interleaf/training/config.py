"""Typed, validated training configs: one stage, or a recipe of stages, from YAML or a dict.

A stage YAML::

    name: pretrain
    model: {preset: tiny-random}      # or {path: runs/x/final}, {from_stage: pretrain},
                                      # or build options {vision: DIR, lm: DIR, tokenizer: DIR, resampler: {...}, ...}
                                      # (token insertion: fusion, projector, insertion as interleaf.build takes them)
    data: data/mix.yaml               # a mixture YAML (relative to this file) or an inline mixture
    freeze: flamingo                  # flamingo | flamingo_train_vision | unfreeze_lm | all_trainable; token
                                      # insertion: projector | projector_lm | all_trainable (default: the
                                      # model's own; flamingo / unfreeze_lm mean projector / projector_lm
                                      # for a token-insertion model and back, see training.prepare)
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
    log_every: 10                     # metrics.jsonl also has tokens/s, FLOP/s and, with a peak, the MFU
    peak_flops: null                  # FLOP/s of one device for the MFU (default: known CUDA GPUs in bf16)
    report_to: [tensorboard]          # trackers given metrics.jsonl's scalars: tensorboard, wandb (default: none)
    seed: 0
    out: runs/name
    distributed: {strategy: ddp}      # ddp | fsdp (used when launched by torchrun with > 1 process)
    objective: lm                     # lm: the next-token loss | dpo: preference pairs (needs dpo:)

A DPO stage (``objective: dpo``) trains on ``format: preference`` sources only, with the sigmoid
DPO loss against a frozen reference, the stage's starting model (see :mod:`interleaf.training.dpo`)::

    objective: dpo
    dpo: {beta: 0.1, reference: model, label_smoothing: 0.0}   # reference: model | cached (required)

A stage may train low-rank adapters instead of whole parts (see :mod:`interleaf.training.lora`)::

    lora: {rank: 8, alpha: 16, dropout: 0.05, parts: [lm_attention, lm_mlp]}

A recipe lists stages (``stages: [...]``); its other top-level keys are defaults for every stage,
a stage without ``out`` writes to ``{recipe out}/{stage name}``, and ``model: {from_stage: NAME}``
starts a stage from an earlier stage's final model.

Relative paths: ``data`` (a mixture file, or the paths inside an inline mixture) is relative to
the config file's folder; ``out`` and ``model`` directories are relative to the working folder.
Every section is a dataclass read by :mod:`interleaf.schema` (types, ranges and choices come from
the type hints; a float field takes a string that spells a number, such as YAML's ``1e-4``), and
every error is a :class:`~interleaf.errors.ConfigError` naming the dotted field and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import FREEZE_POLICIES
from ..errors import ConfigError
from ..files import read_yaml as read_yaml_file
from ..files import names_a_directory, user_path
from ..schema import coerce, fields_of, join, read, reject_unknown, setting, show, with_context
from .lora import LoRAConfig

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
OBJECTIVES = ("lm", "dpo")
REFERENCES = ("model", "cached")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # what YAML 1.1 reads as a string
_BUILD_OPTIONS = (
    "vision", "lm", "tokenizer", "resampler", "cross_attention", "tokens", "fusion", "projector", "insertion",
)


def _in_file(source: str | None) -> str:
    return f" (in {source})" if source else ""


# --------------------------------------------------------------------------- sections


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = setting(1e-4, gt=0)
    weight_decay: float = setting(0.1, ge=0)
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, le=1)
    eps: float = setting(1e-8, gt=0)
    schedule: Literal[SCHEDULES] = "cosine"  # after a linear warmup
    warmup_steps: int = setting(0, ge=0)
    min_lr_ratio: float = setting(0.0, ge=0, le=1)  # the schedule's floor, as a share of lr
    clip_grad_norm: float | None = setting(1.0, gt=0)  # None: no clipping


@dataclass
class CheckpointConfig:
    every: int | None = setting(None, ge=1)  # steps between checkpoints; None: only the final model
    # Complete checkpoints kept on disk. With 2 or more, a newest one found damaged at resume has a
    # predecessor to fall back to; with 1 there is none and resuming stops with an error.
    keep_last: int = setting(2, ge=1)


@dataclass
class DistributedConfig:
    strategy: Literal[STRATEGIES] = "ddp"  # applies when torchrun starts more than one process


@dataclass
class DPOConfig:
    """A DPO stage's loss and reference (see :mod:`interleaf.training.dpo`).

    ``reference`` (required) says where the reference log-probabilities come from, both from the
    stage's starting model: ``model`` keeps a frozen copy of it beside the policy (its weights
    once more in memory, one extra forward pass per step); ``cached`` scores every pair once
    before the first step and keeps two numbers per pair (no second model; the pass over the data
    is repeated when a run resumes).
    """

    beta: float = setting(0.1, gt=0)  # the KL penalty's strength: rewards are beta * (policy - reference) log-probs
    reference: Literal[REFERENCES] | None = None
    label_smoothing: float = setting(0.0, ge=0, le=0.5)  # conservative DPO: the share of labels taken as flipped

    def _check(self, path: str) -> None:
        if self.reference is None:
            raise ConfigError(
                join(path, "reference"), "a DPO stage needs a reference for its log-probabilities",
                "set dpo.reference: model (a frozen copy of the starting model; its weights twice in memory) "
                "or cached (the starting model scores every pair once before training)",
            )


@dataclass
class ModelSpec:
    """Where a stage's model comes from: exactly one of a preset (+ build options), build options, a
    ``save_pretrained`` directory, or an earlier stage's final model."""

    preset: str | None = None
    path: str | None = None
    from_stage: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # interleaf.build keyword arguments

    @classmethod
    def from_config(cls, data: Any, path: str) -> "ModelSpec":
        """Read ``model:``: a mapping of one origin (build options inline), or a preset name / directory."""
        if isinstance(data, str):  # shorthand: a preset name or a directory
            data = {"path" if names_a_directory(data, path) else "preset": data}
        if not isinstance(data, Mapping) or not data:
            raise ConfigError(
                path, f"expected a mapping, got {show(data)}",
                "e.g. {preset: tiny-random}, {path: runs/x/final}, {from_stage: pretrain} or {vision: DIR, lm: DIR}",
            )
        reject_unknown(data, ("preset", "path", "from_stage", *_BUILD_OPTIONS), path)
        options = {k: v for k, v in data.items() if k in _BUILD_OPTIONS}
        origins = [k for k in ("path", "from_stage") if data.get(k) is not None]
        if data.get("preset") is not None or options:
            origins.append("preset" if data.get("preset") is not None else "build options")
        if len(origins) != 1:
            raise ConfigError(
                path, f"give exactly one origin of the model, got {origins or 'none'}",
                "preset (with optional build options), build options (vision, lm, ...), path, or from_stage",
            )
        origin = {k: coerce(data.get(k), str | None, join(path, k)) for k in ("preset", "path", "from_stage")}
        if origin["path"] is not None and options:
            raise ConfigError(join(path, "path"), "a saved model is loaded as it is; build options apply to preset/vision/lm only")
        from ..data.mixture import _expand

        # $VARS in local paths come from the environment, as in mixtures
        options = {k: _expand(v, join(path, k)) if isinstance(v, str) and k in ("vision", "lm", "tokenizer") else v
                   for k, v in options.items()}
        if origin["path"] is not None:
            origin["path"] = _expand(origin["path"], join(path, "path"))
        return cls(**origin, options=options)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("preset", "path", "from_stage") if getattr(self, k) is not None}
        return {**d, **self.options}


@dataclass
class StageConfig:
    """One training stage (see the module docstring)."""

    name: str = setting("train", nonempty=True)
    model: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny-random"))
    data: str | dict | None = None  # a mixture YAML path (absolute after loading) or an inline mixture
    freeze: Literal[FREEZE_POLICIES] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = setting(8, ge=1)
    grad_accum: int = setting(1, ge=1)
    max_steps: int = setting(1000, ge=1)
    max_length: int | None = setting(None, ge=2)
    z_loss: float = setting(0.0, ge=0)
    precision: Literal[PRECISIONS] = "fp32"
    gradient_checkpointing: bool = False
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A step whose loss or gradient norm is NaN or infinite (summed over every process) is skipped:
    # no optimiser update, gradients dropped, counted in summary.json. This many in a row stop the run.
    max_nonfinite_steps: int = setting(3, ge=1)
    log_every: int = setting(10, ge=1)
    peak_flops: float | None = setting(None, gt=0)  # one device's peak FLOP/s for the MFU (training.flops)
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # trackers mirroring metrics.jsonl; none by default
    seed: int = setting(0, ge=0)
    out: str = setting("runs/train", nonempty=True)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    objective: Literal[OBJECTIVES] = "lm"  # lm: the next-token loss; dpo: preference pairs
    dpo: DPOConfig | None = None  # the DPO loss and reference; required with objective: dpo
    lora: LoRAConfig | None = None  # low-rank adapters on the parts it names (training.lora); None: none
    base_dir: str = setting(".", internal=True)  # the config file's folder: relative data paths resolve against it
    source: str | None = setting(None, internal=True)  # the file this stage came from (for error messages)

    def _check(self, path: str) -> None:
        if "/" in self.name:
            raise ConfigError(join(path, "name"), f"must be a non-empty string without '/', got {self.name!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                join(path, "grad_accum"), f"{self.grad_accum} does not divide batch_size {self.batch_size}",
                "batch_size is the samples per optimiser step over all processes and accumulation steps",
            )
        self._check_objective(path)

    def _check_objective(self, path: str) -> None:
        if self.objective != "dpo":
            if self.dpo is not None:
                raise ConfigError(join(path, "dpo"), "applies to DPO stages only", "set objective: dpo, or remove dpo:")
            return
        if self.dpo is None:
            raise ConfigError(
                join(path, "dpo"), "a DPO stage (objective: dpo) needs a dpo section with its reference",
                "add dpo: {reference: model} (a frozen copy of the starting model) or dpo: {reference: cached} "
                "(its log-probabilities computed once before training); beta defaults to 0.1",
            )
        if self.z_loss:
            raise ConfigError(join(path, "z_loss"), "applies to objective: lm; the DPO loss has no z-loss term", "set z_loss: 0")

    def to_dict(self) -> dict:
        """A plain dict that :func:`parse_stage` reads back (saved next to checkpoints)."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["optim"]["betas"] = list(self.optim.betas)
        for key in ("base_dir", "source"):
            d.pop(key)
        if self.objective == "lm":  # a language-modelling stage's dict is what it was before DPO existed
            d.pop("objective")
            d.pop("dpo")
        if self.lora is None:  # nor does a stage without adapters differ from one written before they existed
            d.pop("lora")
        if not self.report_to:  # nor one that tracks nothing from one written before trackers existed
            d.pop("report_to")
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
            raise with_context(e, "data.", _in_file(self.source)) from e
        if self.max_length is not None:
            mixture = dataclasses.replace(mixture, max_length=self.max_length)
        return mixture


def _parse_stage(data: Any, base_dir: str | Path, source: str | None) -> StageConfig:
    """A stage dict read into a :class:`StageConfig`; errors name the field relative to the stage."""
    if not isinstance(data, Mapping):
        raise ConfigError("stage", f"a stage must be a mapping, got {type(data).__name__}")
    d = dict(data)
    reject_unknown(d, fields_of(StageConfig), "")
    d.setdefault("out", f"runs/{d.get('name', 'train')}")
    base = Path(base_dir).expanduser().resolve()
    if isinstance(d.get("data"), str):
        d["data"] = str(base / user_path(d["data"], "data"))
    elif d.get("data") is not None and not isinstance(d["data"], Mapping):
        raise ConfigError("data", f"must be a mixture YAML path or an inline mixture (a mapping), got {show(d['data'])}")
    stage = read(StageConfig, d)
    stage.base_dir, stage.source = str(base), source
    return stage


def parse_stage(data: Any, *, base_dir: str | Path = ".", source: str | None = None, prefix: str = "") -> StageConfig:
    """Validate a stage dict into a :class:`StageConfig`; errors name ``prefix + field`` and ``source``."""
    try:
        return _parse_stage(data, base_dir, source)
    except ConfigError as e:
        raise with_context(e, prefix, _in_file(source)) from e


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
    try:
        return Recipe(_parse_stages(data, base, source), source=source)
    except ConfigError as e:
        raise with_context(e, "", _in_file(source)) from e


def _parse_stages(data: dict, base: Path, source: str | None) -> list[StageConfig]:
    """The stages of a recipe (or the one stage of a stage file); errors name the field, not the file."""
    if "stages" not in data:
        return [_parse_stage(data, base, source)]
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("stages", "must be a non-empty list of stages")
    defaults = {k: v for k, v in data.items() if k != "stages"}
    reject_unknown(defaults, fields_of(StageConfig), "")
    root_out = defaults.pop("out", None)
    if root_out is not None:
        coerce(root_out, str, "out")
        if not root_out:
            raise ConfigError("out", "must not be empty")
    defaults.pop("name", None)
    stages: list[StageConfig] = []
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"stages[{i}]", f"must be a mapping, got {type(raw).__name__}")
        merged = _deep_merge(defaults, raw)
        merged.setdefault("name", f"stage{i}")
        if "out" not in raw and root_out is not None and isinstance(merged["name"], str):
            merged["out"] = str(Path(root_out) / merged["name"])
        try:
            stage = _parse_stage(merged, base, source)
        except ConfigError as e:
            raise with_context(e, f"stages[{i}].") from e
        earlier = [s.name for s in stages]
        if stage.model.from_stage is not None and stage.model.from_stage not in earlier:
            raise ConfigError(
                f"stages[{i}].model.from_stage",
                f"{stage.model.from_stage!r} is not an earlier stage (earlier: {earlier or 'none'})",
            )
        if stage.name in earlier:
            raise ConfigError(f"stages[{i}].name", f"{stage.name!r} is used twice; stage names must be unique")
        stages.append(stage)
    if stages[0].model.from_stage is not None:
        raise ConfigError("stages[0].model.from_stage", "the first stage has no earlier stage to start from")
    return stages


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def llava_mixture(json_path: str | Path, images: str | Path | None = None, fmt: str = "llava") -> dict:
    """An inline one-source mixture for a user's LLaVA-format JSON (absolute paths); ``fmt="preference"``
    for a preference file in the same conventions (a DPO stage's ``--data``)."""
    src: dict[str, Any] = {"name": fmt, "format": fmt, "paths": [str(Path(json_path).expanduser().resolve())]}
    if images is not None:
        src["images_root"] = str(Path(images).expanduser().resolve())
    return {"sources": [src]}


__all__ = [
    "CheckpointConfig", "DPOConfig", "DistributedConfig", "LoRAConfig", "ModelSpec", "OptimConfig", "Recipe", "StageConfig",
    "apply_overrides", "llava_mixture", "load_recipe", "parse_override", "parse_stage",
]
