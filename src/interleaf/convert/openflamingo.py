"""Import OpenFlamingo checkpoints: ``checkpoint.pt`` + the base LM + the CLIP tower -> interleaf.

OpenFlamingo releases only the weights it trains (``checkpoint.pt``: the perceiver, the gated
cross-attention blocks and the LM's resized input embedding, plus the output embedding when its
name contains "embed"); the LM and the vision tower come from their own checkpoints. Here both
are local directories: the LM as transformers saves it (``lm_dir``, with its tokenizer unless
``tokenizer`` is given) and the CLIP vision tower (``vision_dir``), either in open_clip's hub
layout (``open_clip_config.json`` + ``open_clip_model.safetensors``, the tower OpenFlamingo
itself loads; read by :mod:`interleaf.convert.open_clip`) or as a transformers CLIP model (e.g.
``openai/clip-vit-large-patch14`` saved with ``save_pretrained``, the same ViT-L/14).

The checkpoint is read as released (a flat ``name -> tensor`` dict) or as OpenFlamingo's training
script saves it (``{"epoch", "model_state_dict", "optimizer_state_dict", ...}`` with the DDP
``module.`` prefix); both load to the same weights. Pickles are read with ``weights_only=True``.

What OpenFlamingo computes, in interleaf's terms
------------------------------------------------
- Vision: open_clip's ``visual`` with ``output_tokens=True`` gives the last block's patch tokens,
  class token dropped: ``feature_layer=-1, drop_cls_token=True``; whether they pass through
  ``ln_post`` depends on the open_clip version (``patch_ln_post``, below).
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

Three choices the checkpoint does not record (options of :func:`from_openflamingo`)
------------------------------------------------------------------------------------
- ``patch_ln_post`` (default ``False``): open_clip up to 2.22 returns the patch tokens *without*
  its final ``ln_post`` LayerNorm (only the pooled class token gets it); from 2.23 they pass
  through it. OpenFlamingo v2 was trained and evaluated with open_clip 2.20 (its release predates
  2.23), so the released weights saw tokens without ``ln_post``. ``True`` reproduces OpenFlamingo
  run under open_clip >= 2.23. (The perceiver LayerNorms its input, so the two differ through
  ``ln_post``'s affine weights only, but they do differ.)
- ``head_key`` (default: found by name): the checkpoint's name of an untied output head.
  OpenFlamingo keeps every parameter whose name contains "embed", so a GPT-NeoX head saved under
  transformers 4.x (module ``embed_out``, as the released OpenFlamingo-4B) is in the checkpoint
  as ``lang_encoder.embed_out.weight``, while transformers 5 names the same module ``lm_head`` and
  OpenFlamingo then drops it. By default either name is accepted whatever the installed
  transformers calls the module; pass ``head_key`` for a checkpoint that uses another name.
- ``added_head_rows`` (default ``"lm"``): when the checkpoint holds no output head (an untied head
  whose name lacks "embed": GPT-NeoX under transformers 5, LLaMA's ``lm_head``), the output rows
  of the added tokens are the ones OpenFlamingo computed with: the base LM's rows after
  ``resize_token_embeddings(len(tokenizer))`` (for LMs with spare rows, like RedPajama's 50432
  for a 50280-token tokenizer, the LM's own rows, not zeros). ``"zeros"`` gives those tokens zero
  logits instead. A tied head (MPT) always follows the checkpoint's input embedding.

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
    lang_encoder.<head>.weight        L <head>.weight and .extra (untied head, when saved: GPT-NeoX embed_out)

(``L`` = ``language_model.``.) A missing or unexpected key raises :class:`CheckpointError`
listing them.
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
ADDED_HEAD_ROWS = ("lm", "zeros")
# an untied head's module name under transformers 4.x and 5 (OpenFlamingo saves it only when it contains "embed")
_HEAD_NAMES = {"gpt_neox": ("embed_out", "lm_head")}

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


def _head_keys(lm_type: str, head_path: str | None, head_key: str | None) -> list[str]:
    """The checkpoint names an untied output head may have: ``head_key``, else its module name under the
    installed transformers and under the other major version (GPT-NeoX: ``embed_out`` / ``lm_head``)."""
    if head_key is not None:
        return [head_key]
    if head_path is None:
        return []
    names = [head_path.removeprefix("language_model."), *_HEAD_NAMES.get(lm_type, ())]
    return [f"lang_encoder.{n}.weight" for n in dict.fromkeys(names)]


def _map_checkpoint(
    model: torch.nn.Module, state: dict[str, torch.Tensor], table: dict[str, tuple[str, ...]],
    vocab: int, base_vocab: int, what: str, *, lm_type: str = "", head_key: str | None = None,
    added_head_rows: str = "lm",
) -> dict[str, torch.Tensor]:
    """``state`` in interleaf's names: the table's keys, the embedding (all rows), the head and the added rows."""
    emb_path = _module_path(model, model.get_input_embeddings())
    head = model.language_model.get_output_embeddings()  # the LM's module (the model's is a full-vocabulary view)
    head_path = _module_path(model, head) if head is not None else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    emb_src = "lang_encoder." + emb_path.removeprefix("language_model.") + ".weight"
    head_keys = _head_keys(lm_type, head_path, head_key)
    unknown = [k for k in state if k not in table and k != emb_src and k not in head_keys]
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
        mapped.update(_head_rows(head, head_path, state, head_keys, embedding if tied else None,
                                 vocab, base_vocab, what, added_head_rows))
    return mapped


def _head_rows(
    head: torch.nn.Module, head_path: str, state: dict[str, torch.Tensor], head_keys: list[str],
    tied_to: torch.Tensor | None, vocab: int, base_vocab: int, what: str, added_head_rows: str,
) -> dict[str, torch.Tensor]:
    """The output head's tensors: from the checkpoint when it holds them, else per ``added_head_rows``."""
    found = [k for k in head_keys if k in state]
    if len(found) > 1:
        raise CheckpointError(f"{what}: holds the output head twice ({found}); pass head_key=<the one to use>")
    src = found[0] if found else None
    if tied_to is not None:  # the head is the input embedding (MPT): a saved copy must agree with it
        if src is not None and not torch.equal(state[src], tied_to):
            raise CheckpointError(f"{what}: {src} differs from the input embedding, but this LM ties its head to it")
        return {f"{head_path}.extra": tied_to[base_vocab:]} if vocab > base_vocab else {}
    out: dict[str, torch.Tensor] = {}
    if src is not None:
        if state[src].shape[0] != vocab:
            raise CheckpointError(f"{what}: {src} has {state[src].shape[0]} rows but the tokenizer has {vocab}")
        out[f"{head_path}.weight"] = state[src]
        rows = state[src][base_vocab:]
    elif added_head_rows == "lm":  # the resized base LM's rows, which OpenFlamingo computed with
        rows = head.weight[base_vocab:vocab].detach().clone()
    else:
        rows = torch.zeros_like(head.extra)
    if vocab > base_vocab:
        out[f"{head_path}.extra"] = rows
    return out


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
    patch_ln_post: bool = False,
    head_key: str | None = None,
    added_head_rows: str = "lm",
) -> Path:
    """Convert an OpenFlamingo ``checkpoint.pt`` (with its base LM and CLIP tower) to an interleaf directory.

    ``checkpoint_pt`` is the released flat state dict or the training script's
    ``checkpoint_<epoch>.pt`` (``model_state_dict``, ``module.`` keys). ``vision_dir`` is an
    open_clip directory (``open_clip_config.json``) or a transformers CLIP directory.
    ``cross_attn_every_n_layers`` must be the value the model was trained with (1 for
    OpenFlamingo-3B, 2 for 4B, 4 for 9B); the checkpoint's block positions are checked against it.

    The defaults reproduce the released OpenFlamingo v2 checkpoints (see the module docstring):
    ``patch_ln_post=False`` (patch tokens without open_clip's ``ln_post``, as open_clip <= 2.22
    gave them; ``True`` for a model run under open_clip >= 2.23); ``head_key=None`` (an untied
    head is read under its transformers 4 or 5 name, e.g. GPT-NeoX's ``lang_encoder.embed_out.weight``
    or ``lang_encoder.lm_head.weight``; give the checkpoint's name otherwise); ``added_head_rows="lm"``
    (without a saved head, the added tokens' output rows are the resized base LM's, as OpenFlamingo
    ran; ``"zeros"`` gives them zero logits).
    """
    from ..api import save
    from ..model import InterleafForConditionalGeneration
    from ..model.lm import find_decoder_layers
    from ..model.vision import load_vision_tower
    from ..processing import ImageTransform, InterleafProcessor
    from .open_clip import is_open_clip_dir, load_open_clip_vision

    if added_head_rows not in ADDED_HEAD_ROWS:
        raise ConfigError("added_head_rows", f"must be one of {list(ADDED_HEAD_ROWS)}, got {added_head_rows!r}")
    ckpt_path, lm_path = Path(checkpoint_pt).expanduser(), Path(lm_dir).expanduser()
    what = f"OpenFlamingo checkpoint {str(ckpt_path)!r}"
    # 1. the pieces: trained weights, tokenizer with OpenFlamingo's tokens, base LM, vision tower
    state = _read_checkpoint(ckpt_path)
    tok, base_vocab = _tokenizer(lm_path, tokenizer)
    lm = _load_lm(lm_path, tok, dtype)
    if is_open_clip_dir(vision_dir):
        vcfg, vision = load_open_clip_vision(vision_dir, patch_ln_post=patch_ln_post, dtype=dtype)
    else:
        vcfg, vision = load_vision_tower(
            vision_dir, feature_layer=-1, drop_cls_token=True, post_layernorm=patch_ln_post, dtype=dtype
        )

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
    mapped = _map_checkpoint(
        model, state, table, len(tok), base_vocab, what,
        lm_type=getattr(lm.config, "model_type", ""), head_key=head_key, added_head_rows=added_head_rows,
    )
    _check_mapped(model, mapped, what)
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)
    model.apply_freeze()
    processor = InterleafProcessor(
        tok, config.tokens_cfg, ImageTransform.from_vision_config(config.vision_cfg),
        max_length=getattr(lm.config, "max_position_embeddings", None),
    )
    return save(model.eval(), processor, dst_dir, card={"converted_from": checkpoint_pt})
