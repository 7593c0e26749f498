"""IDEFICS <-> interleaf: convert transformers ``IdeficsForVisionText2Text`` checkpoints both ways.

``from_idefics(src, dst)`` reads what ``IdeficsForVisionText2Text.save_pretrained`` writes (plus
the tokenizer / processor files when present), offline, and writes an interleaf directory that
:func:`interleaf.load` reads; ``to_idefics(src, dst)`` goes back. The logits are the same to float
rounding (the tests hold them within 1e-5 in float32).

How the architectures correspond
--------------------------------
- Language model: IDEFICS' decoder is LLaMA (RMSNorm, RoPE, SwiGLU, no biases), so it becomes a
  transformers ``LlamaForCausalLM`` with ``num_key_value_heads = num_attention_heads``.
- Vision tower: ``IdeficsVisionTransformer`` is CLIP's vision transformer (class token, patch
  convolution without bias, learned positions, pre-LayerNorm, pre-LN blocks with biases, the
  ``hidden_act`` of its config). IDEFICS feeds ``last_hidden_state``: every token, class token
  included, *before* ``post_layernorm``. That is ``VisionConfig(kind="clip", feature_layer=-1,
  drop_cls_token=False, post_layernorm=False)``; the weights keep their names.
- Perceiver: the same math as :class:`~interleaf.model.resampler.PerceiverResampler` with
  ``activation="relu"`` and ``ff_mult=4``; keys by :func:`idefics_perceiver_key_map`.
- Gated cross-attention: IDEFICS runs ``gated_cross_attn_layers[j]`` before decoder layer
  ``j * cross_layer_interval`` (``idx % interval == 0``; it has ``num_hidden_layers // interval``
  blocks), so ``cross_attention.layers`` lists those indices. RMSNorm, optional per-head RMSNorm
  on q and k, no RoPE, a SwiGLU MLP of the LM's size, tanh gates (``alpha_cross_attn`` /
  ``alpha_dense``, float -> ``gate_shape="scalar"``, vector -> ``"vector"``), and the MLP acts on
  every token (``ffn_without_image=True``).
- Decoupled vocabulary: ids >= ``vocab_size`` use ``additional_embedding`` and the head's
  ``additional_fc``; ours are ``embed_tokens.extra`` / ``lm_head.extra`` with ``extra_start =
  vocab_size``.

The key table (IDEFICS -> interleaf; ``L`` = ``language_model.``, ``V`` = ``vision_tower.backbone.tower.``)::

    model.embed_tokens.weight                       L model.embed_tokens.weight
    model.embed_tokens.additional_embedding.weight  L model.embed_tokens.extra
    lm_head.weight / lm_head.additional_fc.weight   L lm_head.weight / L lm_head.extra
    model.norm.weight                               L model.norm.weight
    model.layers.{i}.<p>                            L model.layers.{i}[.decoder_layer].<p>
    model.gated_cross_attn_layers.{j}.<p>           L model.layers.{j * interval}.cross_attention.<q>
        input_layernorm -> norm, post_attention_layernorm -> ffn_norm,
        cross_attn.{q,k,v,o}_proj -> {q,k,v,o}_proj, cross_attn.{q,k}_layer_norm -> {q,k}_norm,
        mlp.{gate,up,down}_proj -> ffn.{gate,up,down}_proj, alpha_cross_attn -> attn_gate,
        alpha_dense -> ffn_gate
    model.vision_model.<p>                          V <p>
    model.perceiver_resampler.<p>                   resampler.<q>  (idefics_perceiver_key_map)

Buffers that transformers recomputes (``rotary_emb.inv_freq``, ``embeddings.position_ids``) are
accepted in old checkpoints and dropped; any other key the table does not know is an error.
``dropout`` (training only) is not carried over.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from ..config import CrossAttentionConfig, InterleafConfig, ResamplerConfig, TokensConfig, VisionConfig
from ..errors import CheckpointError, ConfigError
from ..model.resampler import idefics_perceiver_key_map
from ._common import check_keys, expected_shapes, fill_meta_model, read_json, read_weights

__all__ = [
    "from_idefics",
    "idefics_key_map",
    "idefics_to_interleaf_config",
    "interleaf_to_idefics_config",
    "to_idefics",
]

PathLike = str | Path

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
# IDEFICS' image statistics (OpenAI CLIP's), used when the directory has no preprocessor config.
IDEFICS_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STD = (0.26862954, 0.26130258, 0.27577711)

_DERIVED_BUFFERS = re.compile(r"(rotary_emb\.(original_)?inv_freq|embeddings\.position_ids)$")
_ALPHA_INIT = {"zeros": "zeros", "ones": "ones", "normal": "normal", "gaussian": "normal", "random": "normal"}
_XATTN_KEYS = {
    "input_layernorm.weight": "norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "cross_attn.q_proj.weight": "q_proj.weight",
    "cross_attn.k_proj.weight": "k_proj.weight",
    "cross_attn.v_proj.weight": "v_proj.weight",
    "cross_attn.o_proj.weight": "o_proj.weight",
    "cross_attn.q_layer_norm.weight": "q_norm.weight",
    "cross_attn.k_layer_norm.weight": "k_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
    "alpha_cross_attn": "attn_gate",
    "alpha_dense": "ffn_gate",
}
_LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_VISION_LAYER_KEYS = tuple(
    f"{module}.{p}"
    for module in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2",
    )
    for p in ("weight", "bias")
)


# ---------------------------------------------------------------------------------- configs


def _cross_layers(num_layers: int, interval: int) -> list[int]:
    """The decoder layers IDEFICS puts its gated cross-attention blocks in front of."""
    if interval <= 0:
        raise ConfigError("cross_layer_interval", f"must be positive, got {interval}")
    count = num_layers // interval
    if count == 0:
        raise ConfigError(
            "cross_layer_interval", f"{interval} leaves no cross-attention block in {num_layers} layers"
        )
    if num_layers % interval:
        # IDEFICS indexes block idx // interval for every idx % interval == 0, one past its list.
        raise ConfigError(
            "cross_layer_interval",
            f"{interval} does not divide num_hidden_layers={num_layers}; transformers' IDEFICS cannot run "
            "such a model (it would look up a cross-attention block it does not have)",
        )
    return [j * interval for j in range(count)]


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
        image_mean=tuple(pre.get("image_mean") or IDEFICS_MEAN),
        image_std=tuple(pre.get("image_std") or IDEFICS_STD),
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
    p = c.perceiver_config
    resampler = ResamplerConfig(
        enabled=bool(c.use_resampler),
        depth=p.resampler_depth,
        num_latents=p.resampler_n_latents,
        heads=p.resampler_n_heads,
        head_dim=p.resampler_head_dim,
        ff_mult=4,
        qk_norm=bool(p.qk_layer_norms_perceiver),
        activation="relu",
    )
    if c.alpha_initializer not in _ALPHA_INIT:
        raise ConfigError("alpha_initializer", f"unknown IDEFICS alpha initializer {c.alpha_initializer!r}")
    if c.alpha_type not in ("float", "vector"):
        raise ConfigError("alpha_type", f"must be 'float' or 'vector', got {c.alpha_type!r}")
    xattn = CrossAttentionConfig(
        layers=_cross_layers(c.num_hidden_layers, c.cross_layer_interval),
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
    tokens = TokensConfig(
        prompt_format="idefics",
        image_token=IMAGE_TOKEN,
        fake_image_token=FAKE_TOKEN,
        end_of_utterance_token=END_OF_UTTERANCE,
        add_end_of_utterance=add_eou,
        extra_start=c.vocab_size if c.additional_vocab_size else None,
        num_extra=int(c.additional_vocab_size),
        image_token_id=image_id,
    )
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


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise ConfigError(
            field, problem, "only models with IDEFICS' architecture convert to IDEFICS (e.g. ones made by from_idefics)"
        )


def interleaf_to_idefics_config(config: InterleafConfig):
    """The ``IdeficsConfig`` of an interleaf model; raises :class:`ConfigError` naming what IDEFICS cannot express."""
    from transformers import IdeficsConfig

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
            layers == _cross_layers(t.num_hidden_layers, interval) if t.num_hidden_layers % interval == 0 else False,
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
    h = v.hf_config
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
        vision_config=dict(
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
        ),
        perceiver_config=dict(
            use_resampler=r.enabled,
            resampler_n_latents=r.num_latents,
            resampler_depth=r.depth,
            resampler_n_heads=r.heads,
            resampler_head_dim=r.head_dim,
            qk_layer_norms_perceiver=r.qk_norm,
        ),
    )


# ---------------------------------------------------------------------------------- keys


def idefics_key_map(idefics_config) -> dict[str, str]:
    """Every IDEFICS state-dict key of this architecture -> its interleaf key."""
    c = idefics_config
    lm = "language_model."
    out = {
        "model.embed_tokens.weight": f"{lm}model.embed_tokens.weight",
        "model.norm.weight": f"{lm}model.norm.weight",
        "lm_head.weight": f"{lm}lm_head.weight",
    }
    if c.additional_vocab_size:
        out["model.embed_tokens.additional_embedding.weight"] = f"{lm}model.embed_tokens.extra"
        out["lm_head.additional_fc.weight"] = f"{lm}lm_head.extra"
    cross = _cross_layers(c.num_hidden_layers, c.cross_layer_interval)
    for i in range(c.num_hidden_layers):
        dst = f"{lm}model.layers.{i}." + ("decoder_layer." if i in cross else "")
        for key in _LAYER_KEYS:
            out[f"model.layers.{i}.{key}"] = dst + key
    for j, i in enumerate(cross):
        for src, dst in _XATTN_KEYS.items():
            if "layer_norm" in src and not c.qk_layer_norms:
                continue
            out[f"model.gated_cross_attn_layers.{j}.{src}"] = f"{lm}model.layers.{i}.cross_attention.{dst}"
    vis = "vision_tower.backbone.tower."
    for key in (
        "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
        "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias",
    ):
        out[f"model.vision_model.{key}"] = vis + key
    for i in range(c.vision_config.num_hidden_layers):
        for key in _VISION_LAYER_KEYS:
            out[f"model.vision_model.encoder.layers.{i}.{key}"] = f"{vis}encoder.layers.{i}.{key}"
    if c.use_resampler:
        depth = c.perceiver_config.resampler_depth
        for src, dst in idefics_perceiver_key_map(depth, prefix="model.perceiver_resampler.").items():
            if ("q_layer_norm" in src or "k_layer_norm" in src) and not c.perceiver_config.qk_layer_norms_perceiver:
                continue
            out[src] = "resampler." + dst
    return out


def _map_state(state: dict[str, torch.Tensor], table: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    unknown = [k for k in state if k not in table and not _DERIVED_BUFFERS.search(k)]
    missing = [k for k in table if k not in state]
    if unknown or missing:
        # Report in the source's names: that is what the user can look at.
        check_keys(
            {k: v for k, v in state.items() if k in table},
            {k: state[k].shape if k in state else torch.Size() for k in table},
            what=what,
            unmapped=unknown,
        )
    return {table[k]: v for k, v in state.items() if k in table}


# ---------------------------------------------------------------------------------- files


def _load_tokenizer(directory: Path, tokenizer: Any):
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    source = Path(tokenizer) if tokenizer is not None else directory
    if not any((source / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(
            f"{str(source)!r} has no tokenizer files; save the IDEFICS processor (or tokenizer) into the "
            "checkpoint directory, or pass tokenizer=<directory with the IDEFICS tokenizer>"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the IDEFICS tokenizer from {str(source)!r}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def _processor(config: InterleafConfig, tokenizer):
    from ..processing import ImageTransform, InterleafProcessor

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
        return read_json(pre)
    proc = directory / "processor_config.json"
    if proc.is_file():
        section = read_json(proc).get("image_processor")
        return section if isinstance(section, dict) else None
    return None


def from_idefics(src_dir: PathLike, dst_dir: PathLike, *, tokenizer: Any = None) -> Path:
    """Convert a transformers IDEFICS checkpoint directory into an interleaf directory.

    ``src_dir`` is what ``IdeficsForVisionText2Text.save_pretrained`` (and the processor's
    ``save_pretrained``) wrote; ``tokenizer`` overrides where the tokenizer comes from. Returns
    ``dst_dir``, which :func:`interleaf.load` reads. Nothing is downloaded.
    """
    from transformers import IdeficsConfig

    from ..api import save
    from ..model import InterleafForConditionalGeneration

    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} is not an IDEFICS save_pretrained directory (no config.json)")
    model_type = read_json(src / "config.json").get("model_type")
    if model_type != "idefics":
        raise CheckpointError(f"{str(src / 'config.json')!r} has model_type {model_type!r}, expected 'idefics'")
    idefics_config = IdeficsConfig.from_pretrained(str(src), local_files_only=True)
    tok = _load_tokenizer(src, tokenizer)
    preprocessor = _image_processor_settings(src)
    config = idefics_to_interleaf_config(idefics_config, tok, preprocessor)

    state = read_weights(src)
    if idefics_config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    mapped = _map_state(state, idefics_key_map(idefics_config), what=f"IDEFICS checkpoint {str(src)!r}")
    with torch.device("meta"):
        model = InterleafForConditionalGeneration(config)
    fill_meta_model(model, mapped, what=f"IDEFICS checkpoint {str(src)!r}")
    model.apply_freeze()
    return save(model.eval(), _processor(config, tok), dst_dir)


def to_idefics(src_dir: PathLike, dst_dir: PathLike) -> Path:
    """Convert an interleaf directory with IDEFICS' architecture back to a transformers IDEFICS one.

    Writes ``IdeficsForVisionText2Text.save_pretrained`` output plus the tokenizer and an
    ``IdeficsProcessor`` (image size, mean and std from the interleaf processor).
    """
    from transformers import IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    from ..config import InterleafConfig as _Config

    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} is not an interleaf directory (no config.json)")
    config = _Config.from_pretrained(str(src), local_files_only=True)
    idefics_config = interleaf_to_idefics_config(config)
    table = idefics_key_map(idefics_config)
    inverse = {v: k for k, v in table.items()}
    state = read_weights(src)
    tied = bool(config.text_config.tie_word_embeddings)
    if tied and "language_model.lm_head.weight" not in state:
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    unknown = [k for k in state if k not in inverse]
    check_keys(
        {k: v for k, v in state.items() if k in inverse},
        {k: state[k].shape if k in state else torch.Size() for k in inverse},
        what=f"interleaf model {str(src)!r}",
        unmapped=unknown,
    )
    mapped = {inverse[k]: v for k, v in state.items()}
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

    from ..processing import InterleafProcessor

    processor = InterleafProcessor.from_pretrained(src)
    t = processor.image_transform
    image_processor = IdeficsImageProcessorPil(image_size=t.image_size, image_mean=list(t.mean), image_std=list(t.std))
    IdeficsProcessor(image_processor, processor.tokenizer).save_pretrained(str(dst))
    return dst
