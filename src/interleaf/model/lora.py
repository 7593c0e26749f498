"""LoRA adapters on an interleaf model: exact targets per part, saving, loading and merging.

A linear layer name such as ``q_proj`` occurs in the LM's self-attention, in every gated
cross-attention block, in the perceiver resampler and in CLIP / SigLIP towers, so a PEFT
``target_modules=["q_proj"]`` adapts all of them. :func:`lora_targets` names the layers of the parts
asked for by their full module paths instead (PEFT matches a listed name exactly, or as a suffix
after a dot, and a full path is the suffix of nothing else)::

    from peft import LoraConfig, get_peft_model
    names = interleaf.lora_targets(model, ["lm_attention", "lm_mlp"])
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=names))

Flamingo's own parts train in full beside the adapters with PEFT's ``modules_to_save`` (PEFT then
saves them with the adapters): ``modules_to_save=["resampler", "cross_attention"]`` for the
cross-attention family, ``["projector"]`` for token insertion. The decoupled rows of added tokens
(``...embed_tokens.extra``, ``...lm_head.extra``) are plain parameters: set their
``requires_grad`` after ``get_peft_model``, which freezes everything else.

The parts (:data:`LORA_PARTS`), each found structurally (no class or layer names):

- ``lm_attention``: the linear layers of each LM decoder layer whose path below the layer names
  attention (a component containing ``attn`` or ``attention``: ``self_attn.q_proj``, GPT-2's
  ``attn.c_attn``);
- ``lm_mlp``: the decoder layers' other linear layers (``mlp.*``, OPT's ``fc1`` / ``fc2``);
- ``cross_attention``: the linear layers of the gated cross-attention blocks (cross-attention family);
- ``resampler`` / ``projector``: the linear layers of what carries the image into the LM, the
  perceiver resampler (cross-attention family) or the projector (token insertion); either name
  means that part in either family, so one recipe serves both;
- ``vision``: the vision tower's linear layers that reach the image features (layers past the
  feature layer never get a gradient and get no adapter).

Embeddings, the output head and the decoupled rows of added tokens are never targets: they are not
linear layers of these parts, and they train in full where the freeze policy says so.

The adapters are attached with transformers' PEFT integration (``model.add_adapter``), so the model
stays an :class:`~interleaf.model.InterleafForConditionalGeneration` (``model.active_adapters()``,
``model.disable_adapters()``). :func:`save_adapted` writes a directory that holds both the base
model (``config.json``, ``model.safetensors``: the weights without adapters) and the adapters in
PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``); :func:`interleaf.load` of
such a directory returns the model with the adapters attached, unmerged, and :func:`merge_lora`
folds them into the base weights (``interleaf merge-lora IN OUT`` writes the result).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .cross_attention import GatedCrossAttentionBlock
from .embeddings import DecoupledEmbedding, DecoupledHead
from .lm import find_decoder_layers

LORA_PARTS = ("lm_attention", "lm_mlp", "cross_attention", "resampler", "projector", "vision")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter files, which PeftModel and transformers read
_INSTALL = "install it with pip install 'interleaf[ecosystem]' (peft is in that extra)"


def require_peft(field: str) -> None:
    """Raise a :class:`ConfigError` on ``field`` when peft is not installed."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(field, "LoRA adapters need the peft package, which is not installed", _INSTALL)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _linears(module: nn.Module, prefix: str, skip: set[int] = frozenset()) -> list[str]:
    """Full names of the linear layers under ``module`` (named ``prefix``), those in ``skip`` left out."""
    return [f"{prefix}.{n}" for n, m in module.named_modules() if n and _is_linear(m) and id(m) not in skip]


def _lm_parts(model: nn.Module) -> tuple[list[str], list[str]]:
    """(attention, MLP) linear layers of the LM's decoder layers; cross-attention blocks excluded."""
    lm = model.language_model
    list_name, layers = find_decoder_layers(lm, lm.config.num_hidden_layers)
    attention, mlp = [], []
    for i, layer in enumerate(layers):
        inner = getattr(layer, "_modules", {}).get("decoder_layer", layer)  # under a cross-attention wrapper
        inner_name = f"language_model.{list_name}.{i}" + (".decoder_layer" if inner is not layer else "")
        for name, module in inner.named_modules():
            if not name or not _is_linear(module):
                continue
            is_attention = any("attn" in part or "attention" in part for part in name.split(".")[:-1])
            (attention if is_attention else mlp).append(f"{inner_name}.{name}")
    return attention, mlp


def _connector(model: nn.Module) -> tuple[str, nn.Module | None]:
    if model.config.fusion == "token_insertion":
        return "projector", getattr(model, "projector", None)
    return "resampler", model.resampler


def _part_names(model: nn.Module, part: str) -> list[str]:
    if part in ("lm_attention", "lm_mlp"):
        attention, mlp = _lm_parts(model)
        return attention if part == "lm_attention" else mlp
    if part == "cross_attention":
        if model.config.fusion != "cross_attention":
            raise ConfigError(
                "lora.parts", f"'cross_attention': a {model.config.fusion!r} model has no cross-attention blocks",
                "adapt lm_attention, lm_mlp, projector or vision",
            )
        names = []
        for name, module in model.named_modules():
            if isinstance(module, GatedCrossAttentionBlock):
                names += _linears(module, name)
        return names
    if part in ("resampler", "projector"):
        attr, module = _connector(model)
        if module is None:
            raise ConfigError("lora.parts", f"{part!r}: this model has no {attr}", "leave it out of lora.parts")
        return _linears(module, attr)
    unused = getattr(getattr(model.vision_tower, "backbone", None), "unused_parameters", list)()
    unused_ids = {id(p) for p in unused}
    skip = {id(m) for m in model.vision_tower.modules()
            if any(True for _ in m.parameters()) and all(id(p) in unused_ids for p in m.parameters())}
    return _linears(model.vision_tower, "vision_tower", skip)


def check_parts(parts, field: str = "lora.parts") -> tuple[str, ...]:
    """``parts`` as a tuple of known part names; an unknown or empty list is a :class:`ConfigError`."""
    if isinstance(parts, str):
        parts = [parts]
    parts = tuple(parts)
    if not parts:
        raise ConfigError(field, "names no part to adapt", f"list one or more of {list(LORA_PARTS)}")
    for i, part in enumerate(parts):
        if part not in LORA_PARTS:
            raise ConfigError(f"{field}[{i}]", f"unknown part {part!r}", f"choose from {list(LORA_PARTS)}")
    return parts


def lora_targets(model: nn.Module, parts=("lm_attention", "lm_mlp")) -> list[str]:
    """The full module names of the linear layers of ``parts`` (see :data:`LORA_PARTS`), sorted.

    Pass them as PEFT's ``LoraConfig(target_modules=...)``: only those layers get adapters. A part
    the model lacks (``cross_attention`` in a token-insertion model) is a :class:`ConfigError`.
    """
    names: set[str] = set()
    for part in check_parts(parts):
        names.update(_part_names(model, part))
    if not names:
        raise ConfigError("lora.parts", f"{list(parts)} hold no linear layer in this model", "choose other parts")
    return sorted(names)


# --------------------------------------------------------------------------- attaching


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries adapters attached by transformers' PEFT integration."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def _kept_in_full(model: nn.Module, parts: tuple[str, ...], targets: list[str]) -> set[int]:
    """Ids of the parameters that stop training in full when ``parts`` get adapters: the adapted
    layers' own weights, and all of the LM's (but the cross-attention blocks and the added token
    rows) or the vision tower's when they are adapted."""
    frozen: set[int] = set()
    modules = dict(model.named_modules())
    for name in targets:
        frozen.update(id(p) for p in modules[name].parameters())
    if any(p in parts for p in ("lm_attention", "lm_mlp")):
        keep = set()
        for m in model.language_model.modules():
            if isinstance(m, GatedCrossAttentionBlock):
                keep.update(id(p) for p in m.parameters())
            elif isinstance(m, (DecoupledEmbedding, DecoupledHead)):
                keep.update(id(p) for p in (m.extra, getattr(m, "extra_bias", None)) if p is not None)
        frozen.update(id(p) for p in model.language_model.parameters() if id(p) not in keep)
    if "vision" in parts:
        frozen.update(id(p) for p in model.vision_tower.parameters())
    return frozen


def add_lora(model: nn.Module, parts, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Attach a LoRA adapter to the layers of ``parts``; returns the adapted layers' names.

    What trained in full before (the freeze policy's choice) keeps training, except the adapted
    layers' own weights and, when the LM or the vision tower is adapted, the rest of that part (its
    embeddings and norms): the adapters stand in for training it. The cross-attention blocks, the
    resampler or projector and the added token rows keep the policy's choice unless adapted.
    """
    require_peft("lora")
    from peft import LoraConfig

    parts = check_parts(parts)
    targets = lora_targets(model, parts)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = _kept_in_full(model, parts, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
        else:
            p.requires_grad_(id(p) in trained and id(p) not in frozen)
    return targets


# --------------------------------------------------------------------------- saving, loading, merging


def _plain_name(name: str) -> str | None:
    """A base model's parameter name for ``name`` in an adapted model; None for an adapter's own."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state (or ``state``, e.g. gathered from shards) without its adapters, under the base model's names."""
    state = model.state_dict() if state is None else state
    return {plain: t for n, t in state.items() if (plain := _plain_name(n)) is not None}


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters' weights under the keys PEFT writes (``base_model.model.<layer>.lora_A.weight``)."""
    out = {}
    for name, t in (model.state_dict() if state is None else state).items():
        if ".lora_" in name:
            out[_PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")] = t.detach().cpu().contiguous()
    return out


def save_adapted(model: nn.Module, processor, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the base model, its processor and the adapters (PEFT's files) into ``path``; ``state``
    replaces the model's own state dict (full tensors gathered from FSDP shards)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model._hf_peft_config_loaded = False  # transformers would otherwise write the adapters alone
    try:
        model.save_pretrained(p, state_dict=plain_state_dict(model, state))
    finally:
        model._hf_peft_config_loaded = True
    config = model.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path = None  # the base model is this directory
    config.save_pretrained(str(p))
    save_file(adapter_state_dict(model, state), str(p / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if processor is not None:
        processor.save_pretrained(p)
    return p


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model directory of an adapter directory: itself when it holds ``config.json``, else the
    local directory its ``adapter_config.json`` names (``base_model_name_or_path``)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    from ..files import read_json

    base = read_json(p / ADAPTER_CONFIG, ADAPTER_CONFIG, error=CheckpointError).get("base_model_name_or_path")
    if not base or not (Path(base).expanduser() / "config.json").is_file():
        raise CheckpointError(
            f"adapter directory {str(p)!r} holds no config.json and its {ADAPTER_CONFIG} names no local base model "
            f"(base_model_name_or_path: {json.dumps(base)}); set base_model_name_or_path to the directory of the "
            "model the adapters were trained on, or save with interleaf.save, which writes both"
        )
    return Path(base).expanduser()


def check_adapter_dir(path: str | Path) -> None:
    """Refuse an adapter directory when peft is missing (loading would otherwise drop the adapters)."""
    if importlib.util.find_spec("peft") is None:
        raise CheckpointError(f"{str(path)!r} holds LoRA adapters ({ADAPTER_CONFIG}), which need peft: {_INSTALL}, "
                              "or load a copy merged with `interleaf merge-lora IN OUT` on a machine that has it")


def attach_saved(model: nn.Module, path: str | Path) -> None:
    """Attach the adapters saved in ``path`` to ``model`` (unless loading already did), frozen."""
    if not has_adapters(model):
        model.load_adapter(str(path), adapter_name=ADAPTER_NAME, local_files_only=True)
    if not has_adapters(model):
        raise CheckpointError(f"the adapters in {str(path)!r} could not be attached to the model")
    # Loading the adapters left transformers' key renaming for adapter files on the model, which its
    # save_pretrained would apply to the base weights too; the model's own names need none.
    model.__dict__.pop("_weight_conversions", None)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights, in place; ``model`` is then a plain interleaf model."""
    if not has_adapters(model):
        raise CheckpointError("the model carries no LoRA adapters to merge")
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.get_base_layer())
    model._hf_peft_config_loaded = False
    model.__dict__.pop("peft_config", None)
    return model


__all__ = [
    "LORA_PARTS", "add_lora", "adapter_base", "adapter_state_dict", "attach_saved", "check_adapter_dir", "check_parts",
    "has_adapters", "is_adapter_dir", "lora_targets", "merge_lora", "plain_state_dict", "require_peft", "save_adapted",
]
