"""interleaf -> IDEFICS: the config an IDEFICS-shaped interleaf model has there, and :func:`to_idefics`.

:func:`interleaf_to_idefics_config` first checks that the model has IDEFICS' architecture (each
difference is a :class:`ConfigError` naming the field), then writes the ``IdeficsConfig``;
:func:`to_idefics` renames the weights by the inverse of :func:`~.keys.idefics_key_map` and
writes a ``save_pretrained`` directory with an ``IdeficsProcessor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...config import InterleafConfig
from ...errors import CheckpointError, ConfigError
from .._common import check_keys, expected_shapes, read_weights
from .keys import cross_layers, idefics_key_map, map_to_idefics

__all__ = ["interleaf_to_idefics_config", "to_idefics"]

PathLike = str | Path


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise ConfigError(
            field, problem, "only models with IDEFICS' architecture convert to IDEFICS (e.g. ones made by from_idefics)"
        )


def _check_architecture(config: InterleafConfig) -> int | None:
    """Raise :class:`ConfigError` on the first thing IDEFICS cannot express; the cross-layer interval."""
    t = config.text_config
    v, r, x, k = config.vision_cfg, config.resampler_cfg, config.xattn_cfg, config.tokens_cfg
    _require(v.kind == "clip", "vision.kind", f"IDEFICS' tower is CLIP-like, got {v.kind!r}")
    _require(t is not None and t.model_type == "llama", "text_config.model_type", "IDEFICS' decoder is LLaMA")
    _require(
        t.num_key_value_heads in (None, t.num_attention_heads), "text_config.num_key_value_heads",
        "IDEFICS has no grouped-query attention",
    )
    _require(not getattr(t, "attention_bias", False) and not getattr(t, "mlp_bias", False), "text_config", "IDEFICS has no biases")
    _require(
        v.feature_layer in (-1, v.layers) and not v.drop_cls_token and not v.post_layernorm,
        "vision.feature_layer",
        "IDEFICS uses the last layer's tokens, class token kept, without post_layernorm",
    )
    _require(not r.enabled or (r.activation == "relu" and r.ff_mult == 4), "resampler", "IDEFICS' perceiver is relu, ff_mult 4")
    interval = None
    layers = x.layer_indices(t.num_hidden_layers)
    if layers:
        interval = layers[1] - layers[0] if len(layers) > 1 else t.num_hidden_layers
        _require(
            layers == cross_layers(t.num_hidden_layers, interval) if t.num_hidden_layers % interval == 0 else False,
            "cross_attention.layers",
            f"IDEFICS needs blocks before layers 0, n, 2n, ... covering all {t.num_hidden_layers} layers, got {layers}",
        )
    _require(x.norm == "rms" and x.ffn == "gated", "cross_attention.norm", "IDEFICS uses RMSNorm and a SwiGLU MLP")
    _require(x.ffn_without_image, "cross_attention.ffn_without_image", "IDEFICS applies the MLP to every token")
    _require(
        (x.heads or t.num_attention_heads) == t.num_attention_heads
        and (x.head_dim or t.hidden_size // t.num_attention_heads) == t.hidden_size // t.num_attention_heads,
        "cross_attention.heads", "IDEFICS' cross-attention has the LM's heads",
    )
    _require((x.ffn_dim or t.intermediate_size) == t.intermediate_size, "cross_attention.ffn_dim", "must equal the LM's")
    _require(x.activation == t.hidden_act, "cross_attention.activation", "must equal the LM's hidden_act")
    _require(x.norm_eps == t.rms_norm_eps, "cross_attention.norm_eps", "must equal the LM's rms_norm_eps")
    _require(
        not k.num_extra or k.extra_start == t.vocab_size, "tokens.extra_start",
        "IDEFICS' additional rows follow the base vocabulary",
    )
    return interval


def _vision_section(h: dict[str, Any]) -> dict[str, Any]:
    """IDEFICS' ``vision_config`` from the CLIP tower's transformers config."""
    return dict(
        embed_dim=h["hidden_size"],
        image_size=h["image_size"],
        intermediate_size=h["intermediate_size"],
        patch_size=h["patch_size"],
        num_hidden_layers=h["num_hidden_layers"],
        num_attention_heads=h["num_attention_heads"],
        num_channels=h.get("num_channels", 3),
        hidden_act=h["hidden_act"],
        layer_norm_eps=h["layer_norm_eps"],
        attention_dropout=h.get("attention_dropout", 0.0),
    )


def interleaf_to_idefics_config(config: InterleafConfig):
    """The ``IdeficsConfig`` of an interleaf model; raises :class:`ConfigError` naming what IDEFICS cannot express."""
    from transformers import IdeficsConfig

    interval = _check_architecture(config)
    t = config.text_config
    v, r, x, k = config.vision_cfg, config.resampler_cfg, config.xattn_cfg, config.tokens_cfg
    gate_init = x.gate_init
    return IdeficsConfig(
        vocab_size=t.vocab_size,
        additional_vocab_size=k.num_extra,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        hidden_act=t.hidden_act,
        initializer_range=t.initializer_range,
        alpha_initializer=gate_init,
        alphas_initializer_range=x.gate_init_std,
        alpha_type="float" if x.gate_shape == "scalar" else "vector",
        rms_norm_eps=t.rms_norm_eps,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        tie_word_embeddings=bool(t.tie_word_embeddings),
        cross_layer_interval=interval,
        qk_layer_norms=x.qk_norm,
        use_resampler=r.enabled,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=dict(t.rope_parameters) if t.rope_parameters else None,
        freeze_text_layers=config.freeze == "flamingo",
        freeze_vision_layers=config.freeze != "all_trainable",
        vision_config=_vision_section(v.hf_config),
        perceiver_config=dict(
            use_resampler=r.enabled,
            resampler_n_latents=r.num_latents,
            resampler_depth=r.depth,
            resampler_n_heads=r.heads,
            resampler_head_dim=r.head_dim,
            qk_layer_norms_perceiver=r.qk_norm,
        ),
    )


def to_idefics(src_dir: PathLike, dst_dir: PathLike) -> Path:
    """Convert an interleaf directory with IDEFICS' architecture back to a transformers IDEFICS one.

    Writes ``IdeficsForVisionText2Text.save_pretrained`` output plus the tokenizer and an
    ``IdeficsProcessor`` (image size, mean and std from the interleaf processor).
    """
    from transformers import IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    from ...processing import InterleafProcessor

    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} is not an interleaf directory (no config.json)")
    config = InterleafConfig.from_pretrained(str(src), local_files_only=True)
    idefics_config = interleaf_to_idefics_config(config)
    state = read_weights(src)
    tied = bool(config.text_config.tie_word_embeddings)
    if tied and "language_model.lm_head.weight" not in state:
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    mapped = map_to_idefics(state, idefics_key_map(idefics_config), what=f"interleaf model {str(src)!r}")
    with torch.device("meta"):
        # transformers cannot build alpha "normal" + "float" (torch.normal gets an int size); the
        # initialiser does not matter here, every tensor comes from the checkpoint.
        initializer, idefics_config.alpha_initializer = idefics_config.alpha_initializer, "zeros"
        model = IdeficsForVisionText2Text(idefics_config)
        model.config.alpha_initializer = initializer
    check_keys(mapped, expected_shapes(model), what=f"interleaf model {str(src)!r} as IDEFICS")
    model.load_state_dict(mapped, strict=True, assign=True)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    processor = InterleafProcessor.from_pretrained(src)
    t = processor.image_transform
    image_processor = IdeficsImageProcessorPil(image_size=t.image_size, image_mean=list(t.mean), image_std=list(t.std))
    IdeficsProcessor(image_processor, processor.tokenizer).save_pretrained(str(dst))
    return dst
