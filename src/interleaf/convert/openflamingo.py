"""Import OpenFlamingo checkpoints: ``checkpoint.pt`` + the base LM + the CLIP tower -> interleaf.

OpenFlamingo releases only the weights it trains (``checkpoint.pt``: the perceiver, the gated
cross-attention blocks and the LM's resized input embedding, plus the output embedding when its
name contains "embed"); the LM and the vision tower come from their own checkpoints. Here both
are local transformers directories: the LM (``lm_dir``, with its tokenizer unless ``tokenizer``
is given) and a CLIP vision model (``vision_dir``, e.g. ``openai/clip-vit-large-patch14`` saved
with ``save_pretrained``, the same ViT-L/14 OpenFlamingo takes from open_clip).

What OpenFlamingo computes, in interleaf's terms
------------------------------------------------
- Vision: open_clip's ``visual`` with ``output_tokens=True`` gives the last layer's patch tokens
  after ``ln_post``, class token dropped: ``feature_layer=-1, drop_cls_token=True,
  post_layernorm=True``.
- Perceiver: LayerNorm'd media and latents, keys/values over ``concat(media, latents)``, a GELU
  feed-forward (x4), a final LayerNorm; 8 heads (hard-coded in OpenFlamingo), ``dim_head`` from
  the weights.
- Gated cross-attention before decoder layer ``i`` when ``(i + 1) % cross_attn_every_n_layers ==
  0``: LayerNorm (eps 1e-5), 8 heads x 64, a plain GELU feed-forward x4 with its own LayerNorm,
  tanh gates; the feed-forward acts on every token (``ffn_without_image=True``).
- Tokens: OpenFlamingo adds ``<|endofchunk|>`` then ``<image>`` to the tokenizer (and ``<PAD>``
  when it has no pad token) and resizes the embedding to ``len(tokenizer)``; those rows become
  the decoupled ``extra`` rows. Because OpenFlamingo trains the *whole* input embedding, the base
  rows are taken from the checkpoint too.

The key table (``P`` = ``perceiver.``, ``X`` = ``lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.``,
``<decoder layers>`` = the LM's layer list, e.g. ``model.layers``, ``transformer.blocks``)::

    P latents                         resampler.latents
    P layers.{d}.0.norm_media         resampler.layers.{d}.attn.norm_media      (weight, bias)
    P layers.{d}.0.norm_latents       resampler.layers.{d}.attn.norm_latents    (weight, bias)
    P layers.{d}.0.to_q               resampler.layers.{d}.attn.q_proj
    P layers.{d}.0.to_kv              resampler.layers.{d}.attn.k_proj | v_proj (rows split in half)
    P layers.{d}.0.to_out             resampler.layers.{d}.attn.out_proj
    P layers.{d}.1.0 / 1.1 / 1.3      resampler.layers.{d}.ff.norm / ff.fc1 / ff.fc2
    P norm                            resampler.norm
    X attn_gate / ff_gate             L <layers>.{i}.cross_attention.attn_gate / ffn_gate
    X attn.norm                       L <layers>.{i}.cross_attention.norm
    X attn.to_q / attn.to_out         L <layers>.{i}.cross_attention.q_proj / o_proj
    X attn.to_kv                      L <layers>.{i}.cross_attention.k_proj | v_proj (split)
    X ff.0 / ff.1 / ff.3              L <layers>.{i}.cross_attention.ffn_norm / ffn.up_proj / ffn.down_proj
    lang_encoder.<embedding>.weight   L <embedding>.weight (all rows) and .extra (the added rows)
    lang_encoder.<head>.weight        L <head>.extra (added rows; only if saved, e.g. GPT-NeoX embed_out)

(``L`` = ``language_model.``.) A missing or unexpected key raises :class:`CheckpointError`
listing them. The one deliberate gap: an untied output head whose name lacks "embed" (LLaMA's
``lm_head``) is not in ``checkpoint.pt``; OpenFlamingo left its new rows at their small random
initialisation, untrained, and here they are zero.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..config import CrossAttentionConfig, InterleafConfig, ResamplerConfig, TokensConfig
from ..errors import CheckpointError, ConfigError
from ._common import check_keys, load_pickle

__all__ = ["from_openflamingo", "openflamingo_key_map", "OPENFLAMINGO_TOKENS"]

PathLike = str | Path
OPENFLAMINGO_TOKENS = ("<|endofchunk|>", "<image>")  # the order OpenFlamingo adds them in
OPENFLAMINGO_HEADS = 8  # both the perceiver and the cross-attention use 8 heads

_PERCEIVER_ATTN = {"0.norm_media": "attn.norm_media", "0.norm_latents": "attn.norm_latents"}
_PERCEIVER_LINEAR = {"0.to_q": "attn.q_proj", "0.to_out": "attn.out_proj", "1.1": "ff.fc1", "1.3": "ff.fc2"}
_XATTN = {
    "attn.to_q.weight": "q_proj.weight",
    "attn.to_out.weight": "o_proj.weight",
    "attn.norm.weight": "norm.weight",
    "attn.norm.bias": "norm.bias",
    "ff.0.weight": "ffn_norm.weight",
    "ff.0.bias": "ffn_norm.bias",
    "ff.1.weight": "ffn.up_proj.weight",
    "ff.3.weight": "ffn.down_proj.weight",
    "attn_gate": "attn_gate",
    "ff_gate": "ffn_gate",
}


def openflamingo_key_map(
    depth: int, layers_path: str, cross_layers: list[int]
) -> dict[str, tuple[str, ...]]:
    """OpenFlamingo key -> interleaf key(s); two targets mean "split the rows in half (k, v)"."""
    out: dict[str, tuple[str, ...]] = {"perceiver.latents": ("resampler.latents",)}
    for suffix in ("weight", "bias"):
        out[f"perceiver.norm.{suffix}"] = (f"resampler.norm.{suffix}",)
    for d in range(depth):
        src, dst = f"perceiver.layers.{d}", f"resampler.layers.{d}"
        for old, new in {**_PERCEIVER_ATTN, "1.0": "ff.norm"}.items():
            for suffix in ("weight", "bias"):
                out[f"{src}.{old}.{suffix}"] = (f"{dst}.{new}.{suffix}",)
        for old, new in _PERCEIVER_LINEAR.items():
            out[f"{src}.{old}.weight"] = (f"{dst}.{new}.weight",)
        out[f"{src}.0.to_kv.weight"] = (f"{dst}.attn.k_proj.weight", f"{dst}.attn.v_proj.weight")
    for i in cross_layers:
        src = f"lang_encoder.{layers_path}.{i}.gated_cross_attn_layer"
        dst = f"language_model.{layers_path}.{i}.cross_attention"
        for old, new in _XATTN.items():
            out[f"{src}.{old}"] = (f"{dst}.{new}",)
        out[f"{src}.attn.to_kv.weight"] = (f"{dst}.k_proj.weight", f"{dst}.v_proj.weight")
    return out


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"OpenFlamingo checkpoint {str(path)!r} does not exist (expected its checkpoint.pt)")
    state = load_file(str(path)) if path.suffix == ".safetensors" else load_pickle(path)
    # Checkpoints saved from DDP / FSDP / torch.compile carry wrapper prefixes.
    return {
        re.sub(r"^(module\.|_orig_mod\.)+", "", k).replace("._checkpoint_wrapped_module", ""): v
        for k, v in state.items()
    }


def _tokenizer(lm_dir: Path, tokenizer: Any):
    from ..processing.tokenizer import load_tokenizer

    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(Path(tokenizer) if tokenizer is not None else lm_dir)
    base = len(tokenizer)
    missing = [t for t in OPENFLAMINGO_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer, base


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ConfigError("text_config", f"cannot find {type(module).__name__} inside the LM")


def _resampler_config(state: dict[str, torch.Tensor], vision_width: int) -> ResamplerConfig:
    if "perceiver.latents" not in state:
        raise CheckpointError("the OpenFlamingo checkpoint has no perceiver.latents: is it an OpenFlamingo checkpoint.pt?")
    num_latents, dim = state["perceiver.latents"].shape
    if dim != vision_width:
        raise CheckpointError(
            f"the checkpoint's perceiver is {dim} wide but the vision tower outputs {vision_width}: "
            "pass the vision tower the model was trained with"
        )
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    inner = state["perceiver.layers.0.0.to_q.weight"].shape[0] if depth else OPENFLAMINGO_HEADS
    ff = state["perceiver.layers.0.1.1.weight"].shape[0] if depth else 4 * dim
    if depth == 0 or inner % OPENFLAMINGO_HEADS or ff % dim:
        raise CheckpointError("the checkpoint's perceiver weights do not have OpenFlamingo's shapes")
    return ResamplerConfig(
        depth=depth, num_latents=int(num_latents), heads=OPENFLAMINGO_HEADS, head_dim=inner // OPENFLAMINGO_HEADS,
        ff_mult=ff // dim, qk_norm=False, activation="gelu",
    )


def _load_lm(lm_path: Path, tokenizer, dtype: torch.dtype | None):
    """The base LM with its embedding resized to the tokenizer with OpenFlamingo's tokens."""
    from transformers import AutoModelForCausalLM

    if not (lm_path / "config.json").is_file():
        raise CheckpointError(f"language model {str(lm_path)!r} is not a local transformers directory (no config.json)")
    lm = AutoModelForCausalLM.from_pretrained(str(lm_path), local_files_only=True, dtype=dtype)
    lm.resize_token_embeddings(len(tokenizer))  # as OpenFlamingo does
    return lm


def _cross_attention_config(
    state: dict[str, torch.Tensor], layers_path: str, num_layers: int, every: int, what: str
) -> CrossAttentionConfig:
    """The blocks' config, after checking the checkpoint has them where ``every`` places them."""
    found = sorted(
        {int(m.group(1)) for k in state if (m := re.match(rf"lang_encoder\.{re.escape(layers_path)}\.(\d+)\.gated_cross_attn_layer\.", k))}
    )
    expected_layers = CrossAttentionConfig(every_n_layers=every).layer_indices(num_layers)
    if found != expected_layers:
        raise CheckpointError(
            f"{what} has cross-attention blocks before decoder layers {found} (under lang_encoder.{layers_path}), but "
            f"cross_attn_every_n_layers={every} places them before {expected_layers}; pass the "
            "value the model was trained with (1 for OpenFlamingo-3B, 2 for 4B, 4 for 9B) and its base LM"
        )
    prefix = f"lang_encoder.{layers_path}.{expected_layers[0]}.gated_cross_attn_layer."
    inner = state[prefix + "attn.to_q.weight"].shape[0] if prefix + "attn.to_q.weight" in state else OPENFLAMINGO_HEADS
    ffn_dim = state[prefix + "ff.1.weight"].shape[0] if prefix + "ff.1.weight" in state else None
    return CrossAttentionConfig(
        every_n_layers=every, heads=OPENFLAMINGO_HEADS, head_dim=max(1, inner // OPENFLAMINGO_HEADS),
        qk_norm=False, norm="layer", ffn="plain", ffn_dim=ffn_dim, activation="gelu", gate_init="zeros",
        gate_shape="scalar", ffn_without_image=True, norm_eps=1e-5,
    )


def _tokens_config(tokenizer, base_vocab: int) -> TokensConfig:
    """The rows OpenFlamingo added to the tokenizer become the decoupled ``extra`` rows."""
    num_extra = len(tokenizer) - base_vocab
    return TokensConfig(
        prompt_format="openflamingo",
        extra_start=base_vocab if num_extra else None,
        num_extra=num_extra,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def _map_checkpoint(
    model: torch.nn.Module, state: dict[str, torch.Tensor], table: dict[str, tuple[str, ...]],
    vocab: int, base_vocab: int, what: str,
) -> dict[str, torch.Tensor]:
    """``state`` in interleaf's names: the table's keys, the embedding (all rows) and the added rows."""
    emb_path = _module_path(model, model.get_input_embeddings())
    head = model.get_output_embeddings()
    head_path = _module_path(model, head) if head is not None else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    emb_src = "lang_encoder." + emb_path.removeprefix("language_model.") + ".weight"
    head_src = "lang_encoder." + head_path.removeprefix("language_model.") + ".weight" if head_path else None
    special = {emb_src} | ({head_src} if head_src else set())
    unknown = [k for k in state if k not in table and k not in special]
    missing = [k for k in [*table, emb_src] if k not in state]
    if unknown or missing:
        check_keys(
            {k: v for k, v in state.items() if k in table or k == emb_src},
            {k: state[k].shape if k in state else torch.Size() for k in [*table, emb_src]},
            what=what, unmapped=unknown,
        )
    mapped: dict[str, torch.Tensor] = {}
    for src, targets in table.items():
        parts = state[src].chunk(len(targets), dim=0)  # to_kv: (2 * inner, D) -> k (inner, D), v (inner, D)
        mapped.update(zip(targets, parts))
    embedding = state[emb_src]  # (len(tokenizer), D): OpenFlamingo trains every row
    if embedding.shape[0] != vocab:
        raise CheckpointError(
            f"{what}: {emb_src} has {embedding.shape[0]} rows but the tokenizer with OpenFlamingo's tokens has "
            f"{vocab}; use the tokenizer of the LM the checkpoint was trained on"
        )
    mapped[f"{emb_path}.weight"] = embedding
    if vocab > base_vocab:
        mapped[f"{emb_path}.extra"] = embedding[base_vocab:]
        if head_path is not None:
            if tied:
                mapped[f"{head_path}.extra"] = embedding[base_vocab:]
            elif head_src in state:
                mapped[f"{head_path}.weight"] = state[head_src]
                mapped[f"{head_path}.extra"] = state[head_src][base_vocab:]
            else:  # not saved by OpenFlamingo (untrained rows): zero
                mapped[f"{head_path}.extra"] = torch.zeros_like(model.get_output_embeddings().extra)
    return mapped


def _check_mapped(model: torch.nn.Module, mapped: dict[str, torch.Tensor], what: str) -> None:
    """Every mapped tensor has the model's shape, and every trainable tensor (perceiver, blocks) is filled."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(mapped, {k: shapes[k] for k in mapped if k in shapes}, what=what + " (mapped)")
    unexpected = [k for k in mapped if k not in shapes]
    if unexpected:
        raise CheckpointError(f"{what}: mapped keys the model lacks: {unexpected[:10]}")
    must_fill = {k for k in shapes if k.startswith("resampler.") or ".cross_attention." in k}
    unfilled = sorted(must_fill - set(mapped))
    if unfilled:
        raise CheckpointError(f"{what}: no weights for {len(unfilled)} trainable tensors: {unfilled[:10]}")


def from_openflamingo(
    checkpoint_pt: PathLike,
    lm_dir: PathLike,
    vision_dir: PathLike,
    dst_dir: PathLike,
    *,
    cross_attn_every_n_layers: int = 1,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert an OpenFlamingo ``checkpoint.pt`` (with its base LM and CLIP tower) to an interleaf directory.

    ``cross_attn_every_n_layers`` must be the value the model was trained with (1 for
    OpenFlamingo-3B, 2 for 4B, 4 for 9B); the checkpoint's block positions are checked against it.
    """
    from ..api import save
    from ..model import InterleafForConditionalGeneration
    from ..model.lm import find_decoder_layers
    from ..model.vision import load_vision_tower
    from ..processing import ImageTransform, InterleafProcessor

    ckpt_path, lm_path = Path(checkpoint_pt).expanduser(), Path(lm_dir).expanduser()
    what = f"OpenFlamingo checkpoint {str(ckpt_path)!r}"
    # 1. the pieces: trained weights, tokenizer with OpenFlamingo's tokens, base LM, vision tower
    state = _read_checkpoint(ckpt_path)
    tok, base_vocab = _tokenizer(lm_path, tokenizer)
    lm = _load_lm(lm_path, tok, dtype)
    vcfg, vision = load_vision_tower(vision_dir, feature_layer=-1, drop_cls_token=True, post_layernorm=True, dtype=dtype)

    # 2. the config, read from the pieces' shapes
    num_layers = lm.config.num_hidden_layers
    layers_path, _ = find_decoder_layers(lm, num_layers)
    xcfg = _cross_attention_config(state, layers_path, num_layers, cross_attn_every_n_layers, what)
    config = InterleafConfig(
        vision=vcfg, resampler=_resampler_config(state, vcfg.width), cross_attention=xcfg,
        tokens=dataclasses.asdict(_tokens_config(tok, base_vocab)), text_config=lm.config, freeze="flamingo",
    )
    model = InterleafForConditionalGeneration(config, language_model=lm, vision_model=vision.backbone.tower)
    if dtype is not None:
        model.to(dtype)

    # 3. the checkpoint's tensors into the model
    table = openflamingo_key_map(config.resampler_cfg.depth, layers_path, xcfg.layer_indices(num_layers))
    mapped = _map_checkpoint(model, state, table, len(tok), base_vocab, what)
    _check_mapped(model, mapped, what)
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)
    model.apply_freeze()
    processor = InterleafProcessor(
        tok, config.tokens_cfg, ImageTransform.from_vision_config(config.vision_cfg),
        max_length=getattr(lm.config, "max_position_embeddings", None),
    )
    return save(model.eval(), processor, dst_dir)
