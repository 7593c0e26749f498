"""Typed, validated configuration for an interleaf model.

A model config is five small dataclasses (vision tower, resampler, cross-attention, special
tokens, freeze policy) plus the language model's own transformers config, carried by
:class:`InterleafConfig`, a ``transformers.PreTrainedConfig`` so that ``save_pretrained`` /
``from_pretrained`` and the ``Auto*`` classes work. Every field is checked at construction and a
bad value raises :class:`~interleaf.errors.ConfigError` naming the dotted field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedConfig

from .errors import ConfigError

FREEZE_POLICIES = ("flamingo", "flamingo_train_vision", "unfreeze_lm", "all_trainable")
FUSIONS = ("cross_attention",)  # "token_insertion" (xGen-MM, LLaVA) plugs in here
PROMPT_FORMATS = ("openflamingo", "idefics")


def user_path(path: str | Path, field: str) -> Path:
    """``path`` with ``~`` expanded; a NUL byte or an unknown ``~user`` is a :class:`ConfigError` naming ``field``."""
    text = str(path)
    if "\x00" in text:
        raise ConfigError(field, f"{text!r} holds a NUL character, which no path may hold; check the path")
    try:
        return Path(text).expanduser()
    except RuntimeError as e:  # "~someone" for an unknown user, or no home directory
        raise ConfigError(field, f"cannot expand '~' in {text!r} ({e})", "write the full path") from e


def read_yaml_file(path: str | Path, field: str, hint: str) -> Any:
    """Parse a YAML file; a missing file or broken YAML is a :class:`ConfigError` naming ``field``."""
    import yaml

    p = user_path(path, field)
    if not p.is_file():
        raise ConfigError(field, f"file {str(p)!r} does not exist", hint)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(field, f"{str(p)!r} is not valid YAML ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"{str(p)!r} is not UTF-8 text ({e})", "save the YAML file as UTF-8") from e
    except RecursionError as e:
        raise ConfigError(field, f"{str(p)!r} nests too deeply to read", "write a flatter YAML file") from e


def _check_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{section}.{name}", f"must be a positive integer, got {value!r}")


def _check_int(section: str, obj: Any, name: str, allow_none: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{name}", f"must be an integer{' or null' if allow_none else ''}, got {value!r}")


def _check_bool(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{name}", f"must be true or false, got {value!r}")


def _check_number(section: str, obj: Any, name: str, low: float, open_low: bool = False) -> float:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{section}.{name}", f"must be a finite number, got {value!r}")
    if value < low or (open_low and value == low):
        raise ConfigError(f"{section}.{name}", f"must be {'>' if open_low else '>='} {low}, got {value!r}")
    return float(value)


def _three_numbers(section: str, name: str, value: Any) -> tuple[float, float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value
    )
    if not ok:
        raise ConfigError(f"{section}.{name}", f"needs three finite numbers (R, G, B), got {value!r}")
    return tuple(float(x) for x in value)  # type: ignore[return-value]


def _check_choice(section: str, obj: Any, name: str, choices: tuple) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{section}.{name}", f"must be one of {list(choices)}, got {value!r}")


def _from_dict(cls, section: str, data: Any):
    """Build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(section, f"must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}", "unknown field", f"known fields: {', '.join(sorted(known))}"
        )
    return cls(**data)


@dataclass
class VisionConfig:
    """The vision tower. Output features are ``(B, N_img, V, Dv)``."""

    kind: Literal["builtin", "clip", "siglip"] = "builtin"
    # -- built-in ViT, for training from scratch --
    image_size: int = 32  # square input side in pixels
    patch_size: int = 4  # side of one patch; V = (image_size / patch_size) ** 2
    width: int = 64  # Dv
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    conv_stem: bool = False  # strided 3x3 convolutions instead of one patchify conv: learns shapes faster
    # -- transformers towers (CLIP, SigLIP) --
    hf_config: dict | None = None  # the tower's transformers config as a dict
    feature_layer: int = -1  # which hidden layer's patch features: -1 last, -2 penultimate, ...
    drop_cls_token: bool = False  # drop the leading class token (CLIP) from the features
    post_layernorm: bool = False  # apply the tower's final LayerNorm to the chosen layer
    # -- preprocessing (defaults: CLIP's statistics) --
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resize: Literal["shortest_edge_crop", "squash"] = "shortest_edge_crop"

    def __post_init__(self):
        _check_choice("vision", self, "kind", ("builtin", "clip", "siglip"))
        _check_choice("vision", self, "resize", ("shortest_edge_crop", "squash"))
        _check_bool("vision", self, "conv_stem", "drop_cls_token", "post_layernorm")
        _check_int("vision", self, "feature_layer")
        self.image_mean = _three_numbers("vision", "image_mean", self.image_mean)
        self.image_std = _three_numbers("vision", "image_std", self.image_std)
        if any(s <= 0 for s in self.image_std):
            raise ConfigError("vision.image_std", f"must be positive, got {self.image_std}")
        if self.kind == "builtin":
            _check_positive("vision", self, "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
            if self.image_size % self.patch_size:
                raise ConfigError(
                    "vision.patch_size",
                    f"{self.patch_size} does not divide image_size {self.image_size}",
                )
            if self.width % self.heads:
                raise ConfigError("vision.heads", f"{self.heads} does not divide width {self.width}")
            if self.conv_stem and self.patch_size & (self.patch_size - 1):
                raise ConfigError("vision.patch_size", "the convolutional stem needs a power-of-two patch size")
        else:
            if not isinstance(self.hf_config, dict):
                raise ConfigError(
                    "vision.hf_config",
                    f"a '{self.kind}' tower needs its transformers vision config as a dict",
                    "pass vision=<local directory> to interleaf.build, or a CLIPVisionConfig().to_dict()",
                )
            for name, key in (("image_size", "image_size"), ("patch_size", "patch_size"), ("width", "hidden_size"),
                              ("layers", "num_hidden_layers")):
                value = self.hf_config.get(key, getattr(self, name))
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"vision.hf_config.{key}", f"must be a positive integer, got {value!r}")
                setattr(self, name, value)
            if not -self.layers - 1 <= self.feature_layer <= self.layers:
                raise ConfigError(
                    "vision.feature_layer",
                    f"{self.feature_layer} is out of range for a tower with {self.layers} layers",
                )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ResamplerConfig:
    """Perceiver resampler: V patch features -> ``num_latents`` latents, keeping the vision width."""

    enabled: bool = True
    depth: int = 6
    num_latents: int = 64
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    qk_norm: bool = False  # LayerNorm on queries and keys per head (IDEFICS)
    activation: Literal["gelu", "relu"] = "gelu"  # OpenFlamingo: gelu; IDEFICS: relu

    def __post_init__(self):
        _check_positive("resampler", self, "depth", "num_latents", "heads", "head_dim", "ff_mult")
        _check_choice("resampler", self, "activation", ("gelu", "relu"))
        _check_bool("resampler", self, "enabled", "qk_norm")


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention blocks inserted before chosen decoder layers of the LM."""

    every_n_layers: int = 1  # a block before layer i when (i + 1) % n == 0 (OpenFlamingo's rule)
    layers: list[int] | None = None  # explicit layer indices; overrides every_n_layers
    heads: int | None = None  # None: the LM's attention heads
    head_dim: int | None = None  # None: LM hidden size / heads
    qk_norm: bool = False  # RMSNorm on queries and keys per head (IDEFICS)
    norm: Literal["rms", "layer"] = "rms"
    ffn: Literal["gated", "plain"] = "gated"  # gated: SwiGLU-style like LLaMA; plain: Linear-act-Linear
    ffn_dim: int | None = None  # None: the LM's intermediate size (gated) or 4 x hidden (plain)
    activation: str = "silu"
    gate_init: Literal["zeros", "ones", "normal"] = "zeros"
    gate_init_std: float = 0.0  # std for gate_init="normal"
    gate_shape: Literal["scalar", "vector"] = "scalar"
    ffn_without_image: bool = False  # apply the gated FFN to tokens that see no image (IDEFICS, OpenFlamingo)
    norm_eps: float = 1e-6

    def __post_init__(self):
        _check_positive("cross_attention", self, "every_n_layers")
        for name in ("heads", "head_dim", "ffn_dim"):
            if getattr(self, name) is not None:
                _check_positive("cross_attention", self, name)
        _check_choice("cross_attention", self, "norm", ("rms", "layer"))
        _check_choice("cross_attention", self, "ffn", ("gated", "plain"))
        _check_choice("cross_attention", self, "gate_init", ("zeros", "ones", "normal"))
        _check_choice("cross_attention", self, "gate_shape", ("scalar", "vector"))
        self.gate_init_std = _check_number("cross_attention", self, "gate_init_std", 0.0)
        self.norm_eps = _check_number("cross_attention", self, "norm_eps", 0.0, open_low=True)
        _check_bool("cross_attention", self, "qk_norm", "ffn_without_image")
        if not isinstance(self.activation, str) or not self.activation:
            raise ConfigError("cross_attention.activation", f"must be an activation name (e.g. silu), got {self.activation!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise ConfigError("cross_attention.layers", f"must be a list of layer indices >= 0, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError("cross_attention.layers", f"has repeated indices: {self.layers}")
            self.layers = sorted(int(i) for i in self.layers)

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder layers that get a block in front of them."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                raise ConfigError(
                    "cross_attention.layers", f"indices {bad} are out of range for an LM with {num_layers} layers"
                )
            return list(self.layers)
        indices = [i for i in range(num_layers) if (i + 1) % self.every_n_layers == 0]
        if not indices:
            raise ConfigError(
                "cross_attention.every_n_layers",
                f"{self.every_n_layers} leaves no cross-attention in an LM with {num_layers} layers",
            )
        return indices


@dataclass
class TokensConfig:
    """Special tokens and the prompt format of the model family."""

    prompt_format: Literal["openflamingo", "idefics"] = "openflamingo"
    image_token: str = "<image>"
    end_of_chunk_token: str = "<|endofchunk|>"  # OpenFlamingo: ends an image's text chunk
    fake_image_token: str = "<fake_token_around_image>"  # IDEFICS: wraps runs of images
    end_of_utterance_token: str = "<end_of_utterance>"  # IDEFICS instruct: ends a turn
    add_end_of_utterance: bool = False  # whether the tokenizer gets <end_of_utterance>
    # Filled in when the model is built against a tokenizer. Ids in [extra_start, extra_start +
    # num_extra) are the tokens interleaf added: they get their own trainable embedding and output
    # rows, while the LM's base vocabulary stays frozen.
    extra_start: int | None = None
    num_extra: int = 0
    image_token_id: int | None = None

    def __post_init__(self):
        _check_choice("tokens", self, "prompt_format", PROMPT_FORMATS)
        for name in ("image_token", "end_of_chunk_token", "fake_image_token", "end_of_utterance_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"tokens.{name}", "must be a non-empty string")
        _check_bool("tokens", self, "add_end_of_utterance")
        for name in ("extra_start", "image_token_id"):
            _check_int("tokens", self, name, allow_none=True)
        _check_int("tokens", self, "num_extra")

    def required_tokens(self) -> list[str]:
        """Special tokens this prompt format needs in the vocabulary."""
        if self.prompt_format == "idefics":
            tokens = [self.fake_image_token, self.image_token]
            if self.add_end_of_utterance:
                tokens.append(self.end_of_utterance_token)
            return tokens
        return [self.image_token, self.end_of_chunk_token]


def _text_config_from_dict(data: dict) -> PreTrainedConfig:
    from transformers import AutoConfig

    if "model_type" not in data:
        raise ConfigError("text_config.model_type", "is missing: the LM config needs its transformers model_type")
    data = dict(data)
    model_type = data.pop("model_type")
    if not isinstance(model_type, str):
        raise ConfigError("text_config.model_type", f"must be a transformers model type (e.g. 'llama'), got {model_type!r}")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as e:  # ValueError, TypeError, and huggingface_hub's strict-dataclass validation errors
        raise ConfigError("text_config", f"transformers cannot build a {model_type!r} config: {e}") from e


class InterleafConfig(PreTrainedConfig):
    """The config of an :class:`~interleaf.model.InterleafForConditionalGeneration`.

    ``text_config`` is the LM's own transformers config (a dict with ``model_type``); the other
    sections are the dataclasses above, stored as dicts in ``config.json``.
    """

    model_type = "interleaf"
    sub_configs = {"text_config": PreTrainedConfig}

    def __init__(
        self,
        fusion: str = "cross_attention",
        vision: dict | VisionConfig | None = None,
        resampler: dict | ResamplerConfig | None = None,
        cross_attention: dict | CrossAttentionConfig | None = None,
        tokens: dict | TokensConfig | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        freeze: str = "flamingo",
        z_loss: float = 0.0,
        **kwargs,
    ):
        if fusion not in FUSIONS:
            raise ConfigError("fusion", f"must be one of {list(FUSIONS)}, got {fusion!r}")
        if freeze not in FREEZE_POLICIES:
            raise ConfigError("freeze", f"must be one of {list(FREEZE_POLICIES)}, got {freeze!r}")
        if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0:
            raise ConfigError("z_loss", f"must be a number >= 0, got {z_loss!r}")
        self.fusion = fusion
        self.freeze = freeze
        self.z_loss = float(z_loss)
        self.vision_config_ = _from_dict(VisionConfig, "vision", vision)
        self.resampler_config_ = _from_dict(ResamplerConfig, "resampler", resampler)
        self.cross_attention_config_ = _from_dict(CrossAttentionConfig, "cross_attention", cross_attention)
        self.tokens_config_ = _from_dict(TokensConfig, "tokens", tokens)
        if isinstance(text_config, dict):
            text_config = _text_config_from_dict(text_config)
        elif isinstance(text_config, PreTrainedConfig):
            text_config = copy.deepcopy(text_config)  # never mutate the caller's (the LM's own) config
        elif text_config is not None and not isinstance(text_config, PreTrainedConfig):
            raise ConfigError("text_config", "must be the LM's transformers config (or a dict with a 'model_type')")
        self.text_config = text_config
        # Sections are serialised as plain dicts.
        self.vision = dataclasses.asdict(self.vision_config_)
        self.resampler = dataclasses.asdict(self.resampler_config_)
        self.cross_attention = dataclasses.asdict(self.cross_attention_config_)
        self.tokens = dataclasses.asdict(self.tokens_config_)
        super().__init__(**kwargs)
        if text_config is not None:
            layers = getattr(text_config, "num_hidden_layers", None)
            if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
                raise ConfigError("text_config.num_hidden_layers", f"must be a positive integer, got {layers!r}")
            self.cross_attention_config_.layer_indices(layers)  # validates explicit indices
            # Generation defaults come from the LM (pad / bos / eos).
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(self, name, None) is None and getattr(text_config, name, None) is not None:
                    setattr(self, name, getattr(text_config, name))

    # -- typed views --
    @property
    def vision_cfg(self) -> VisionConfig:
        return self.vision_config_

    @property
    def resampler_cfg(self) -> ResamplerConfig:
        return self.resampler_config_

    @property
    def xattn_cfg(self) -> CrossAttentionConfig:
        return self.cross_attention_config_

    @property
    def tokens_cfg(self) -> TokensConfig:
        return self.tokens_config_

    def get_text_config_object(self) -> PreTrainedConfig:
        """The LM's config as a transformers config object."""
        return self.text_config

    def sync_sections(self) -> None:
        """Write the typed sections back into their serialised dicts (after a field changed)."""
        self.vision = dataclasses.asdict(self.vision_config_)
        self.resampler = dataclasses.asdict(self.resampler_config_)
        self.cross_attention = dataclasses.asdict(self.cross_attention_config_)
        self.tokens = dataclasses.asdict(self.tokens_config_)

    def to_dict(self) -> dict[str, Any]:
        self.sync_sections()
        out = super().to_dict()
        for key in list(out):
            if key.endswith("_config_"):
                del out[key]
        return out

    @property
    def vision_width(self) -> int:
        return self.vision_cfg.width
