"""IDEFICS -> interleaf: the config translation and :func:`from_idefics`.

:func:`idefics_to_interleaf_config` states, section by section, the interleaf config that
computes what ``IdeficsForVisionText2Text`` does (the correspondence is in the package
docstring); :func:`from_idefics` reads a ``save_pretrained`` directory offline, renames its
weights by :func:`~.keys.idefics_key_map` and saves an interleaf directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ...config import CrossAttentionConfig, InterleafConfig, ResamplerConfig, TokensConfig, VisionConfig
from ...errors import CheckpointError, ConfigError
from ...files import read_json
from ...config import CLIP_MEAN, CLIP_STD
from .._common import checkpoint_tokenizer, fill_meta_model, read_weights
from .keys import cross_layers, idefics_key_map, map_from_idefics

__all__ = ["from_idefics", "idefics_to_interleaf_config"]

PathLike = str | Path

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"

_ALPHA_INIT = {"zeros": "zeros", "ones": "ones", "normal": "normal", "gaussian": "normal", "random": "normal"}


# ---------------------------------------------------------------------------------- configs


def _vision_config(idefics_config, preprocessor: dict | None) -> VisionConfig:
    from transformers import CLIPVisionConfig

    v = idefics_config.vision_config
    clip = CLIPVisionConfig(
        hidden_size=v.embed_dim,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        num_channels=v.num_channels,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        attention_dropout=v.attention_dropout,
        initializer_range=v.initializer_range,
        initializer_factor=v.initializer_factor,
    )
    pre = preprocessor or {}
    return VisionConfig(
        kind="clip",
        hf_config=clip.to_dict(),
        feature_layer=-1,
        drop_cls_token=False,
        post_layernorm=False,
        # IDEFICS' image statistics are OpenAI CLIP's; used when the directory has no preprocessor config.
        image_mean=tuple(pre.get("image_mean") or CLIP_MEAN),
        image_std=tuple(pre.get("image_std") or CLIP_STD),
        resize="squash",  # IDEFICS resizes straight to image_size x image_size
    )


def _text_config(c) -> dict[str, Any]:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters) if c.rope_parameters else None,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
    ).to_dict()


def _freeze_policy(c) -> str:
    if not c.freeze_text_layers and not c.freeze_vision_layers:
        return "all_trainable"
    if not c.freeze_text_layers:
        return "unfreeze_lm"
    return "flamingo"


def _resampler_config(c) -> ResamplerConfig:
    p = c.perceiver_config
    return ResamplerConfig(
        enabled=bool(c.use_resampler),
        depth=p.resampler_depth,
        num_latents=p.resampler_n_latents,
        heads=p.resampler_n_heads,
        head_dim=p.resampler_head_dim,
        ff_mult=4,
        qk_norm=bool(p.qk_layer_norms_perceiver),
        activation="relu",
    )


def _cross_attention_config(c) -> CrossAttentionConfig:
    if c.alpha_initializer not in _ALPHA_INIT:
        raise ConfigError("alpha_initializer", f"unknown IDEFICS alpha initializer {c.alpha_initializer!r}")
    if c.alpha_type not in ("float", "vector"):
        raise ConfigError("alpha_type", f"must be 'float' or 'vector', got {c.alpha_type!r}")
    return CrossAttentionConfig(
        layers=cross_layers(c.num_hidden_layers, c.cross_layer_interval),
        heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        qk_norm=bool(c.qk_layer_norms),
        norm="rms",
        ffn="gated",
        ffn_dim=c.intermediate_size,
        activation=c.hidden_act,
        gate_init=_ALPHA_INIT[c.alpha_initializer],
        gate_init_std=float(c.alphas_initializer_range),
        gate_shape="scalar" if c.alpha_type == "float" else "vector",
        ffn_without_image=True,
        norm_eps=c.rms_norm_eps,
    )


def _tokens_config(c, tokenizer) -> TokensConfig:
    """IDEFICS' image tokens; the ``<image>`` id and ``<end_of_utterance>`` come from the tokenizer if given."""
    image_id = c.vocab_size + 1 if c.additional_vocab_size >= 2 else None  # IDEFICS' layout: fake, image
    add_eou = False
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        missing = [t for t in (FAKE_TOKEN, IMAGE_TOKEN) if t not in vocab]
        if missing:
            raise CheckpointError(
                f"the IDEFICS tokenizer lacks {missing}; use the tokenizer saved with the IDEFICS checkpoint"
            )
        image_id = vocab[IMAGE_TOKEN]
        add_eou = END_OF_UTTERANCE in vocab
        total = c.vocab_size + c.additional_vocab_size
        too_big = sorted(t for t, i in vocab.items() if i >= total)
        if too_big:
            raise CheckpointError(
                f"the tokenizer has ids beyond the model's {total} rows (vocab_size + additional_vocab_size): "
                f"{too_big[:5]}; use the tokenizer that belongs to this checkpoint"
            )
    return TokensConfig(
        prompt_format="idefics",
        image_token=IMAGE_TOKEN,
        fake_image_token=FAKE_TOKEN,
        end_of_utterance_token=END_OF_UTTERANCE,
        add_end_of_utterance=add_eou,
        extra_start=c.vocab_size if c.additional_vocab_size else None,
        num_extra=int(c.additional_vocab_size),
        image_token_id=image_id,
    )


def idefics_to_interleaf_config(
    idefics_config, tokenizer=None, preprocessor: dict | None = None
) -> InterleafConfig:
    """The :class:`InterleafConfig` computing what ``IdeficsForVisionText2Text(idefics_config)`` does.

    ``tokenizer`` (optional) supplies the id of ``<image>`` and whether ``<end_of_utterance>``
    exists (the instruct models); ``preprocessor`` the image mean and std.
    """
    c = idefics_config
    if c.tie_word_embeddings and c.additional_vocab_size:
        raise ConfigError(
            "tie_word_embeddings",
            "an IDEFICS model that ties its output head to the embedding and has additional tokens ties "
            "the additional rows too, which interleaf's decoupled head does not do",
            "untie the checkpoint (tie_word_embeddings=False) before converting",
        )
    resampler = _resampler_config(c)
    xattn = _cross_attention_config(c)
    tokens = _tokens_config(c, tokenizer)
    return InterleafConfig(
        vision=_vision_config(c, preprocessor),
        resampler=resampler,
        cross_attention=xattn,
        tokens=dataclasses.asdict(tokens),
        text_config=_text_config(c),
        freeze=_freeze_policy(c),
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )


# ---------------------------------------------------------------------------------- files


def _load_tokenizer(directory: Path, tokenizer: Any):
    return checkpoint_tokenizer(directory, tokenizer, "IDEFICS")


def _processor(config: InterleafConfig, tokenizer):
    from ...processing import ImageTransform, InterleafProcessor

    return InterleafProcessor(
        tokenizer,
        config.tokens_cfg,
        ImageTransform.from_vision_config(config.vision_cfg),
        max_length=getattr(config.text_config, "max_position_embeddings", None),
    )


def _image_processor_settings(directory: Path) -> dict | None:
    """IDEFICS' image processor settings: ``preprocessor_config.json`` or ``processor_config.json``."""
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        return read_json(pre, "IDEFICS checkpoint", error=CheckpointError)
    proc = directory / "processor_config.json"
    if proc.is_file():
        section = read_json(proc, "IDEFICS checkpoint", error=CheckpointError).get("image_processor")
        return section if isinstance(section, dict) else None
    return None


def from_idefics(src_dir: PathLike, dst_dir: PathLike, *, tokenizer: Any = None) -> Path:
    """Convert a transformers IDEFICS checkpoint directory into an interleaf directory.

    ``src_dir`` is what ``IdeficsForVisionText2Text.save_pretrained`` (and the processor's
    ``save_pretrained``) wrote; ``tokenizer`` overrides where the tokenizer comes from. Returns
    ``dst_dir``, which :func:`interleaf.load` reads. Nothing is downloaded.
    """
    from transformers import IdeficsConfig

    from ...api import save
    from ...model import InterleafForConditionalGeneration

    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} is not an IDEFICS save_pretrained directory (no config.json)")
    model_type = read_json(src / "config.json", "IDEFICS checkpoint", error=CheckpointError).get("model_type")
    if model_type != "idefics":
        raise CheckpointError(f"{str(src / 'config.json')!r} has model_type {model_type!r}, expected 'idefics'")
    idefics_config = IdeficsConfig.from_pretrained(str(src), local_files_only=True)
    tok = _load_tokenizer(src, tokenizer)
    preprocessor = _image_processor_settings(src)
    config = idefics_to_interleaf_config(idefics_config, tok, preprocessor)

    state = read_weights(src)
    if idefics_config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    mapped = map_from_idefics(state, idefics_key_map(idefics_config), what=f"IDEFICS checkpoint {str(src)!r}")
    with torch.device("meta"):
        model = InterleafForConditionalGeneration(config)
    fill_meta_model(model, mapped, what=f"IDEFICS checkpoint {str(src)!r}")
    model.apply_freeze()
    return save(model.eval(), _processor(config, tok), dst_dir, card={"converted_from": src})
