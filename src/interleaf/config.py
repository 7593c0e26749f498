"""Typed, validated configuration for an interleaf model.

A model config is small dataclasses (vision tower, resampler, cross-attention, special tokens,
and for the token-insertion family the projector and the placement) plus the language model's
own transformers config, carried by
:class:`InterleafConfig`, a ``transformers.PreTrainedConfig`` so that ``save_pretrained`` /
``from_pretrained`` and the ``Auto*`` classes work. Every field is checked at construction by the
one config reader, :mod:`interleaf.schema` (types, ranges and choices from the type hints), and a
bad value raises :class:`~interleaf.errors.ConfigError` naming the dotted field.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from transformers import PreTrainedConfig

from .errors import ConfigError
from .insertion_config import (  # noqa: F401 (the token-insertion sections, re-exported)
    ANYRES_CONVENTIONS,
    ANYRES_GRID_MULTIPLES,
    AnyresConfig,
    InsertionConfig,
    ProjectorConfig,
    TokenSamplerConfig,
)
from .schema import coerce, read, setting, validate

# Cross-attention family: flamingo, flamingo_train_vision, unfreeze_lm; token-insertion family:
# projector (projector only), projector_lm (projector + LM); both: all_trainable.
FREEZE_POLICIES = ("flamingo", "flamingo_train_vision", "unfreeze_lm", "all_trainable", "projector", "projector_lm")
# cross_attention: Flamingo, OpenFlamingo, IDEFICS, InfiMM; token_insertion: LLaVA, xGen-MM.
FUSIONS = ("cross_attention", "token_insertion")
PROMPT_FORMATS = ("openflamingo", "idefics", "llava")
PROJECTORS = ("mlp2x_gelu", "linear", "token_sampler")
# Image statistics: CLIP's are the default preprocessing of every vision tower; SigLIP's apply to SigLIP towers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class EvaClipConfig:
    """EVA-CLIP settings beyond the sizes, named as in InfiMM's ``visual``: EVA02 (rope, subln) or 4B (postnorm)."""

    mlp_ratio: float = setting(4.0, gt=0)  # MLP hidden size = int(width * mlp_ratio)
    qkv_bias: bool = True  # q and v biases (k has none)
    rope: bool = False  # 2D rotary embedding on the patch tokens' queries and keys
    pt_hw_seq_len: int = setting(16, ge=1)  # the rotary grid side the tower was trained with
    intp_freq: bool = True  # rotary positions scaled to pt_hw_seq_len whatever the grid
    naiveswiglu: bool = False  # SwiGLU MLP (w1, w2, w3) instead of fc1 -> GELU -> fc2
    subln: bool = False  # separate q/k/v projections, LayerNorm after attention and inside the MLP
    postnorm: bool = False  # x + norm(f(x)) instead of x + f(norm(x))
    norm_eps: float = setting(1e-6, gt=0)  # every LayerNorm of the tower
    trained_image_size: int | None = setting(None, ge=1)  # pos_embed's size, interpolated if not image_size
    embed_dim: int | None = setting(None, ge=1)  # the CLIP head's width (kept, unused); None: no head

    def __post_init__(self):
        validate(self, "eva")


@dataclass
class VisionConfig:
    """The vision tower. Output features are ``(B, N_img, V, Dv)``."""

    kind: Literal["builtin", "clip", "siglip", "eva_clip"] = "builtin"
    # -- built-in ViT, for training from scratch --
    image_size: int = setting(32, ge=1)  # square input side in pixels
    patch_size: int = setting(4, ge=1)  # side of one patch; V = (image_size / patch_size) ** 2
    width: int = setting(64, ge=1)  # Dv
    layers: int = setting(2, ge=1)
    heads: int = setting(4, ge=1)
    mlp_ratio: int = setting(4, ge=1)
    conv_stem: bool = False  # strided 3x3 convolutions instead of one patchify conv: learns shapes faster
    eva: EvaClipConfig | None = None  # kind "eva_clip" (None there: the defaults)
    # -- transformers towers (CLIP, SigLIP) --
    hf_config: dict | None = None  # the tower's transformers config as a dict
    # Which hidden layer's patch features: -1 last, -2 penultimate (LLaVA), ...; a list of layers
    # concatenates their features on the channel axis (LLaVA's list-valued vision_feature_layer).
    feature_layer: int | list[int] = -1
    # Drop the leading class token (CLIP): LLaVA's vision_feature_select_strategy "default" drops
    # it, "full" keeps it; a SigLIP tower has none.
    drop_cls_token: bool = False
    # Apply the tower's final LayerNorm to the chosen layer(s): SigLIP's last_hidden_state (xGen-MM)
    # is post-LN, CLIP's hidden states (LLaVA) are not.
    post_layernorm: bool = False
    # -- preprocessing (defaults: CLIP's statistics) --
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = setting(CLIP_STD, gt=0)
    resize: Literal["shortest_edge_crop", "squash"] = "shortest_edge_crop"

    def __post_init__(self):
        validate(self, "vision")

    def _check(self, path: str) -> None:
        if self.eva is not None and self.kind != "eva_clip":
            raise ConfigError(f"{path}.eva", f"is set but the tower is {self.kind!r}", "remove it, or set kind: eva_clip")
        if self.kind in ("builtin", "eva_clip"):  # sizes from the fields above (EVA-CLIP's heads too)
            if self.image_size % self.patch_size:
                raise ConfigError(f"{path}.patch_size", f"{self.patch_size} does not divide image_size {self.image_size}")
            if self.width % self.heads:
                raise ConfigError(f"{path}.heads", f"{self.heads} does not divide width {self.width}")
        if self.kind == "builtin":
            if self.conv_stem and self.patch_size & (self.patch_size - 1):
                raise ConfigError(f"{path}.patch_size", "the convolutional stem needs a power-of-two patch size")
            return
        if self.kind == "eva_clip":
            self.eva = self.eva or EvaClipConfig()
            if self.eva.rope and (self.width // self.heads) % 4:
                raise ConfigError(f"{path}.heads", f"the head width {self.width // self.heads} is not a multiple of 4",
                                  "the 2D rotary embedding rotates pairs in each half of a head")
            if (self.eva.trained_image_size or self.image_size) % self.patch_size:
                raise ConfigError(f"{path}.eva.trained_image_size", f"is not a multiple of patch_size {self.patch_size}")
        elif self.hf_config is None:
            raise ConfigError(f"{path}.hf_config", f"a '{self.kind}' tower needs its transformers vision config as a dict",
                              "pass vision=<local directory> to interleaf.build, or a CLIPVisionConfig().to_dict()")
        for name, key in (("image_size", "image_size"), ("patch_size", "patch_size"), ("width", "hidden_size"),
                          ("layers", "num_hidden_layers")):
            value = self.hf_config.get(key, getattr(self, name)) if self.hf_config is not None else getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{path}.hf_config.{key}", f"must be a positive integer, got {value!r}")
            setattr(self, name, value)
        layers = self.feature_layers
        if not layers:
            raise ConfigError(f"{path}.feature_layer", "is an empty list", "name at least one layer, e.g. -2")
        for layer in layers:
            if not -self.layers - 1 <= layer <= self.layers:
                raise ConfigError(
                    f"{path}.feature_layer", f"{layer} is out of range for a tower with {self.layers} layers",
                    f"use values in [-{self.layers + 1}, {self.layers}]",
                )

    @property
    def feature_layers(self) -> list[int]:
        """``feature_layer`` as a list (one entry for a single layer)."""
        return list(self.feature_layer) if isinstance(self.feature_layer, (list, tuple)) else [self.feature_layer]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image: the patches, plus a CLIP / EVA-CLIP class token unless it is dropped."""
        return self.num_patches + (1 if self.kind in ("clip", "eva_clip") and not self.drop_cls_token else 0)


@dataclass
class ResamplerConfig:
    """Perceiver resampler: V patch features -> ``num_latents`` latents, keeping the vision width."""

    enabled: bool = True
    depth: int = setting(6, ge=1)
    num_latents: int = setting(64, ge=1)
    heads: int = setting(8, ge=1)
    head_dim: int = setting(64, ge=1)
    ff_mult: int = setting(4, ge=1)
    qk_norm: bool = False  # LayerNorm on queries and keys per head (IDEFICS)
    activation: Literal["gelu", "relu"] = "gelu"  # OpenFlamingo: gelu; IDEFICS: relu

    def __post_init__(self):
        validate(self, "resampler")


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention blocks inserted before chosen decoder layers of the LM."""

    every_n_layers: int = setting(1, ge=1)  # a block before layer i when (i + 1) % n == 0 (OpenFlamingo's rule)
    layers: list[int] | None = setting(None, ge=0)  # explicit layer indices; overrides every_n_layers
    heads: int | None = setting(None, ge=1)  # None: the LM's attention heads
    head_dim: int | None = setting(None, ge=1)  # None: LM hidden size / heads
    qk_norm: bool = False  # RMSNorm on queries and keys per head (IDEFICS)
    norm: Literal["rms", "layer"] = "rms"
    ffn: Literal["gated", "plain"] = "gated"  # gated: SwiGLU-style like LLaMA; plain: Linear-act-Linear
    ffn_dim: int | None = setting(None, ge=1)  # None: the LM's intermediate size (gated) or 4 x hidden (plain)
    activation: str = setting("silu", nonempty=True)  # an activation name (transformers' ACT2FN)
    gate_init: Literal["zeros", "ones", "normal"] = "zeros"
    gate_init_std: float = setting(0.0, ge=0)  # std for gate_init="normal"
    gate_shape: Literal["scalar", "vector"] = "scalar"
    ffn_without_image: bool = False  # apply the gated FFN to tokens that see no image (IDEFICS, OpenFlamingo)
    skip_rows_without_image: bool = False  # InfiMM's per-row flag: a row without image is the plain LM
    norm_eps: float = setting(1e-6, gt=0)

    def __post_init__(self):
        validate(self, "cross_attention")

    def _check(self, path: str) -> None:
        if self.layers is not None:
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"{path}.layers", f"has repeated indices: {self.layers}")
            self.layers = sorted(self.layers)

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

    prompt_format: Literal["openflamingo", "idefics", "llava"] = "openflamingo"
    image_token: str = setting("<image>", nonempty=True)
    end_of_chunk_token: str = setting("<|endofchunk|>", nonempty=True)  # OpenFlamingo: ends an image's text chunk
    fake_image_token: str = setting("<fake_token_around_image>", nonempty=True)  # IDEFICS: wraps runs of images
    end_of_utterance_token: str = setting("<end_of_utterance>", nonempty=True)  # IDEFICS instruct: ends a turn
    add_end_of_utterance: bool = False  # whether the tokenizer gets <end_of_utterance>
    # LLaVA ("llava" format, placement "expand"): how many <image> tokens the processor writes for
    # one image, one per vision token (LLaVA's image_seq_length). Other formats write one.
    image_seq_length: int = setting(1, ge=1)
    # Filled in when the model is built against a tokenizer. Ids in [extra_start, extra_start +
    # num_extra) are the tokens interleaf added: they get their own trainable embedding and output
    # rows, while the LM's base vocabulary stays frozen.
    extra_start: int | None = None
    num_extra: int = 0
    image_token_id: int | None = None
    # xGen-MM's base format (placement "expand"): an image's positions are its <image> token followed by
    # <image placeholder> tokens, image_seq_length in all, all overwritten. None: only <image> tokens.
    image_placeholder_token_id: int | None = None
    # The output rows of the added tokens: "lm" adds them to the LM's head (which keeps its own bias, if
    # any); "xgenmm" is xGen-MM's DecoupledLinear: a bias on the base rows and on the added rows, and the
    # logits end after the added rows: cat((h W^T + b)[..., :extra_start], h A^T + a).
    decoupled_head: Literal["lm", "xgenmm"] = "lm"
    # Placement "replace" (xGen-MM): the positions one image takes in the sequence the LM sees once the
    # model replaces its one <image> token by the image's embeddings (per view under xGen-MM's anyres
    # tiling), so that max_length and token counts measure that sequence. Derived from the model's
    # sections by InterleafConfig; None for every other placement, where the text holds every position.
    image_lm_length: int | None = setting(None, ge=1)

    def __post_init__(self):
        validate(self, "tokens")

    def required_tokens(self) -> list[str]:
        """Special tokens this prompt format needs in the vocabulary."""
        if self.prompt_format == "llava":
            return [self.image_token]
        if self.prompt_format == "idefics":
            tokens = [self.fake_image_token, self.image_token]
            if self.add_end_of_utterance:
                tokens.append(self.end_of_utterance_token)
            return tokens
        return [self.image_token, self.end_of_chunk_token]


def image_embeddings_per_image(projector: dict | ProjectorConfig, vision: dict | VisionConfig) -> int:
    """Embeddings one image becomes in a token-insertion model (without anyres): the token
    sampler's latents, else the vision tower's tokens."""
    projector = projector if isinstance(projector, ProjectorConfig) else read(ProjectorConfig, projector, "projector")
    if projector.kind == "token_sampler":
        return (projector.token_sampler or TokenSamplerConfig()).num_latents
    vision = vision if isinstance(vision, VisionConfig) else read(VisionConfig, vision, "vision")
    return vision.num_tokens


def freeze_policies(fusion: str) -> tuple[str, ...]:
    """The freeze policies that apply to a fusion family."""
    if fusion == "token_insertion":
        return ("projector", "projector_lm", "all_trainable")
    return ("flamingo", "flamingo_train_vision", "unfreeze_lm", "all_trainable")


def check_freeze_policy(policy: str, fusion: str, field: str) -> None:
    """A :class:`ConfigError` when ``policy`` belongs to the other fusion family."""
    if policy not in freeze_policies(fusion):
        raise ConfigError(
            field, f"{policy!r} is not a freeze policy of the {fusion!r} family",
            f"use one of {list(freeze_policies(fusion))}",
        )


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


_SECTION_TYPES = {"vision": VisionConfig, "resampler": ResamplerConfig, "cross_attention": CrossAttentionConfig,
                  "tokens": TokensConfig, "projector": ProjectorConfig, "insertion": InsertionConfig}
_TYPED_NAMES = {"vision": "vision_cfg", "resampler": "resampler_cfg", "cross_attention": "xattn_cfg",
                "tokens": "tokens_cfg", "projector": "projector_cfg", "insertion": "insertion_cfg"}
_TOKEN_INSERTION_SECTIONS = ("projector", "insertion")  # written to config.json for that family only


def _section_property(section: str) -> property:
    typed = _TYPED_NAMES[section]

    def get(self) -> dict:
        return dataclasses.asdict(getattr(self, typed))

    def set_(self, value: Any) -> None:
        setattr(self, typed, read(_SECTION_TYPES[section], value, section))

    return property(get, set_, doc=f"The {section} section as the plain dict ``config.json`` holds.")


class InterleafConfig(PreTrainedConfig):
    """The config of an :class:`~interleaf.model.InterleafForConditionalGeneration`.

    ``text_config`` is the LM's own transformers config (a dict with ``model_type``); the other
    sections are the dataclasses above. Each section is held once, as its dataclass
    (``vision_cfg``, ``resampler_cfg``, ``xattn_cfg``, ``tokens_cfg``); ``vision``, ``resampler``,
    ``cross_attention`` and ``tokens`` render it as the plain dict that ``config.json`` stores.
    """

    model_type = "interleaf"
    sub_configs = {"text_config": PreTrainedConfig}
    # No remote code: loaders that look for one (TRL's create_model_from_path, for a model that is not a
    # transformers class) then use the Auto classes interleaf registers.
    auto_map = MappingProxyType({})

    vision = _section_property("vision")
    resampler = _section_property("resampler")
    cross_attention = _section_property("cross_attention")
    tokens = _section_property("tokens")
    projector = _section_property("projector")
    insertion = _section_property("insertion")

    def __init__(
        self,
        fusion: str = "cross_attention",
        vision: dict | VisionConfig | None = None,
        resampler: dict | ResamplerConfig | None = None,
        cross_attention: dict | CrossAttentionConfig | None = None,
        tokens: dict | TokensConfig | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        freeze: str | None = None,
        z_loss: float = 0.0,
        projector: dict | ProjectorConfig | None = None,
        insertion: dict | InsertionConfig | None = None,
        **kwargs,
    ):
        self.fusion = coerce(fusion, Literal[FUSIONS], "fusion")
        if freeze is None:  # the family's default: train what connects the image to the LM
            freeze = "projector" if fusion == "token_insertion" else "flamingo"
        self.freeze = coerce(freeze, Literal[FREEZE_POLICIES], "freeze")
        self.z_loss = coerce(z_loss, float, "z_loss")
        if self.z_loss < 0:
            raise ConfigError("z_loss", f"must be >= 0, got {z_loss!r}")
        self.vision, self.resampler, self.cross_attention, self.tokens = vision, resampler, cross_attention, tokens
        self.projector, self.insertion = projector, insertion
        self._check_family()
        self._fill_image_lm_length()
        if isinstance(text_config, dict):
            text_config = _text_config_from_dict(text_config)
        elif isinstance(text_config, PreTrainedConfig):
            text_config = copy.deepcopy(text_config)  # never mutate the caller's (the LM's own) config
        elif text_config is not None:
            raise ConfigError("text_config", "must be the LM's transformers config (or a dict with a 'model_type')")
        self.text_config = text_config
        super().__init__(**kwargs)
        if text_config is not None:
            layers = getattr(text_config, "num_hidden_layers", None)
            if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
                raise ConfigError("text_config.num_hidden_layers", f"must be a positive integer, got {layers!r}")
            if self.fusion == "cross_attention":
                self.xattn_cfg.layer_indices(layers)  # validates explicit indices
            # Generation defaults come from the LM (pad / bos / eos).
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(self, name, None) is None and getattr(text_config, name, None) is not None:
                    setattr(self, name, getattr(text_config, name))

    def _check_family(self) -> None:
        """Rules that relate the fusion to the other sections."""
        check_freeze_policy(self.freeze, self.fusion, "freeze")
        if self.fusion == "cross_attention" and self.tokens_cfg.prompt_format == "llava":
            raise ConfigError(
                "tokens.prompt_format", "'llava' writes one <image> per vision token, for token insertion",
                "set fusion: token_insertion, or use the 'openflamingo' or 'idefics' format",
            )
        if self.fusion == "token_insertion" and self.tokens_cfg.prompt_format != "llava" and \
                self.insertion_cfg.placement == "expand":
            raise ConfigError(
                "tokens.prompt_format", f"placement 'expand' needs the 'llava' prompt format, got "
                f"{self.tokens_cfg.prompt_format!r}", "set tokens.prompt_format: llava",
            )

    def _fill_image_lm_length(self) -> None:
        """``tokens.image_lm_length``: what the model makes of one image under placement ``replace``.

        Always derived from the other sections (a value given, e.g. in a config.json whose projector
        was then edited, is replaced), so it cannot disagree with the model."""
        grown = None
        if self.fusion == "token_insertion" and self.insertion_cfg.placement == "replace":
            grown = image_embeddings_per_image(self.projector_cfg, self.vision_cfg)
        self.tokens_cfg.image_lm_length = grown

    def get_text_config_object(self) -> PreTrainedConfig:
        """The LM's config as a transformers config object."""
        return self.text_config

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for section, typed in _TYPED_NAMES.items():
            out.pop(typed, None)
            if section not in _TOKEN_INSERTION_SECTIONS or self.fusion == "token_insertion":
                out[section] = getattr(self, section)
        return out

    @property
    def vision_width(self) -> int:
        return self.vision_cfg.width
