"""The preset registry: the :class:`Preset` record, ``register``, ``get_preset`` and ``presets``.

A preset is a recipe for :func:`interleaf.build`: the sections of an :class:`InterleafConfig`
(vision, resampler, cross-attention, tokens, LM config) and how to get a tokenizer. This module
imports nothing of the presets themselves; :mod:`.tiny` and :mod:`.seeds` register theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    vision: dict[str, Any]
    resampler: dict[str, Any]
    cross_attention: dict[str, Any]
    text_config: dict[str, Any]  # the LM's transformers config; vocab_size None = the tokenizer's size
    tokens: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "tiny"  # "tiny": interleaf's built-in byte-level tokenizer
    freeze: str = "flamingo"
    note: str = ""
    # The token-insertion family (LLaVA, xGen-MM): fusion "token_insertion" with its projector and
    # insertion sections (the cross_attention and resampler sections are then unused).
    fusion: str = "cross_attention"
    projector: dict[str, Any] = field(default_factory=dict)
    insertion: dict[str, Any] = field(default_factory=dict)
    # Why a part of this architecture cannot be built here, and what to do instead ("" = it builds).
    # ``interleaf.build`` refuses such a preset with this text rather than building half of it.
    unavailable: str = ""
    unavailable_part: str = "vision"  # the config field the unavailable part belongs to
    # How the released checkpoints are prompted and stopped. ``interleaf.build`` puts ``chat_template``
    # (jinja, rendered by the tokenizer) on the processor's tokenizer and makes ``stop_token`` its eos token
    # and the generation config's ``eos_token_id`` (when the tokenizer has that token); ``generation``
    # holds the generation config's ids in the released vocabulary (``eos_token_id``, ``pad_token_id``),
    # used as they are when the preset is built without a tokenizer. ``interleaf.save`` writes them all
    # (tokenizer_config.json / chat_template.jinja, generation_config.json).
    chat_template: str | None = None
    stop_token: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)


_PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    _PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}", f"known presets: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def presets() -> dict[str, str]:
    """Names of the registered presets with a one-line description."""
    return {name: p.description for name, p in sorted(_PRESETS.items())}
