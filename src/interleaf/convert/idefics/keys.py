"""IDEFICS' state-dict layout and the key table between it and interleaf's.

Where IDEFICS places its gated cross-attention blocks (:func:`cross_layers`), every IDEFICS key
of an architecture mapped to its interleaf key (:func:`idefics_key_map`), and the strict
renaming of a state dict in either direction.

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

import re

import torch

from ...errors import ConfigError
from ...model.resampler import idefics_perceiver_key_map
from .._common import check_keys

__all__ = ["cross_layers", "idefics_key_map", "map_from_idefics", "map_to_idefics"]

_DERIVED_BUFFERS = re.compile(r"(rotary_emb\.(original_)?inv_freq|embeddings\.position_ids)$")
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


def cross_layers(num_layers: int, interval: int) -> list[int]:
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
    cross = cross_layers(c.num_hidden_layers, c.cross_layer_interval)
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


def map_from_idefics(state: dict[str, torch.Tensor], table: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    """``state`` in IDEFICS' names -> interleaf's by ``table``; derived buffers are dropped, anything else unknown raises."""
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


def map_to_idefics(state: dict[str, torch.Tensor], table: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    """``state`` in interleaf's names -> IDEFICS' by the inverse of ``table``; every key must be in it."""
    inverse = {v: k for k, v in table.items()}
    unknown = [k for k in state if k not in inverse]
    check_keys(
        {k: v for k, v in state.items() if k in inverse},
        {k: state[k].shape if k in state else torch.Size() for k in inverse},
        what=what,
        unmapped=unknown,
    )
    return {inverse[k]: v for k, v in state.items()}
