"""Named architectures.

A preset is a recipe for :func:`interleaf.build`: the sections of an :class:`InterleafConfig`
(vision, resampler, cross-attention, tokens, LM config) and how to get a tokenizer. ``tiny-random``
builds in milliseconds with random weights, for tests and quick trials.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


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


register(
    Preset(
        name="tiny-random",
        description="random weights, built-in ViT (32 px) + 2-layer LLaMA (64 wide); builds in milliseconds",
        vision=dict(kind="builtin", image_size=32, patch_size=8, width=32, layers=1, heads=2),
        resampler=dict(depth=1, num_latents=8, heads=2, head_dim=16),
        cross_attention=dict(every_n_layers=1),
        text_config=dict(
            model_type="llama",
            vocab_size=None,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    )
)


from . import seed_presets  # noqa: E402,F401
