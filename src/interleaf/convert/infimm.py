"""InfiMM checkpoints (``InfiMMZephyrModel`` and its Vicuna / LLaMA siblings) -> interleaf, offline.

An InfiMM folder holds ``config.json`` (``visual``: the EVA-CLIP tower; ``language``: the LM's config;
``cross_attn_every_n_layers``; ``image_token_id``, ``eoc_token_id``) and its weights
(``pytorch_model.bin``, read with ``torch.load(weights_only=True)``, or safetensors). What InfiMM's
code computes, in interleaf's terms:

- Vision: an EVA-CLIP tower (:mod:`interleaf.model.eva_clip`) built from ``visual``; features are the
  last block's output for every token, class token included, without the final norm.
- Perceiver: OpenFlamingo's, as InfiMM's code builds it whatever its README says: 8 heads x
  ``dim_head`` (64 in the released models), ``num_latents`` and depth from the weights, a GELU
  feed-forward, LayerNorms with PyTorch's eps 1e-5, no output projection (width kept).
- Gated cross-attention before decoder layer ``i`` iff ``(i + 1) % cross_attn_every_n_layers == 0``:
  8 heads, LayerNorm (eps 1e-5), a plain GELU feed-forward x4 on every token, tanh gates; a token
  attends only its latest image; InfiMM's per-sample flag (``skip_rows_without_image``): a row
  without any ``<image>`` skips every block and is exactly the plain LM.
- The LM: ``language`` as a transformers config (``model_type`` when it names one; else Mistral when it
  has ``sliding_window``, LLaMA otherwise; ``lm_type`` overrides). InfiMM's two tokens (``<|endofchunk|>``
  and ``<image>``, ids 32000 and 32001 in the released models) are rows of the LM's own embedding and
  head, as released: no decoupled rows, so the converted model has the released parameter count; the
  default freeze policy follows ``freeze_llm`` (``flamingo``, else ``unfreeze_lm``).

The same tensors are registered by InfiMM's code under several names, and a checkpoint may hold any of
them (its ``state_dict()`` holds all)::

    lang_encoder.model.layers.{i}.decoder_layer.X            == lang_encoder.old_decoder_blocks.{i}.X
    lang_encoder.model.layers.{i}.gated_cross_attn_layer.X   == lang_encoder.gated_cross_attn_layers.{i}.X
    vision_encoder.rope.freqs_cos|sin == vision_encoder.blocks.{i}.attn.rope.freqs_cos|sin  (recomputed here)

Keys may carry ``model.`` (InfiMMZephyrModel's attribute) and DeepSpeed's ``module.`` in front. Where
each goes (``L`` = ``language_model.``; the perceiver and block tables are OpenFlamingo's, see
:func:`interleaf.convert.openflamingo.openflamingo_key_map`)::

    vision_encoder.X                                  vision_tower.backbone.X   (EVA-CLIP's own names)
    perceiver.*                                       resampler.*
    lang_encoder.model.layers.{i}.gated_cross_attn_layer.*  L model.layers.{i}.cross_attention.*
    lang_encoder.model.layers.{i}.decoder_layer.X     L model.layers.{i}.decoder_layer.X (a block there)
                                                      L model.layers.{i}.X               (no block)
    lang_encoder.X (embeddings, norm, lm_head)        L X

A key the table does not know, a missing one, a wrong shape, or two aliases holding different values
is one :class:`~interleaf.errors.CheckpointError` listing them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from ..config import CrossAttentionConfig, InterleafConfig, TokensConfig
from ..errors import CheckpointError, ConfigError
from ..files import read_json
from ._common import check_keys, fill_meta_model, optional_tokenizer, read_weights
from .openflamingo import openflamingo_key_map

__all__ = ["INFIMM_HEADS", "from_infimm", "infimm_to_interleaf_config", "load_infimm", "map_from_infimm"]

PathLike = str | Path
INFIMM_HEADS = 8  # the perceiver's and the cross-attention's heads, as InfiMM's code builds them
_PREFIX = re.compile(r"^(module\.)*(model\.)?")
_ALIASES = (
    (re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)$"), "lang_encoder.model.layers.{}.decoder_layer.{}"),
    (re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$"),
     "lang_encoder.model.layers.{}.gated_cross_attn_layer.{}"),
)
_ROPE = re.compile(r"^vision_encoder\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")


# ---------------------------------------------------------------------------------- weights


def canonical_state(state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One key per tensor (prefixes stripped, aliases folded) and, apart, the stored rotary tables."""
    out: dict[str, torch.Tensor] = {}
    rope: dict[str, torch.Tensor] = {}
    differ = []
    for key, value in state.items():
        name = _PREFIX.sub("", key, count=1)
        for pattern, target in _ALIASES:
            m = pattern.match(name)
            if m:
                name = target.format(*m.groups())
        if _ROPE.match(name):
            rope[name] = value
            continue
        if name in out and not torch.equal(out[name], value):
            differ.append(f"{key} (as {name})")
        out[name] = value
    if differ:
        raise CheckpointError(f"{what}: tensors stored under several InfiMM names differ: {differ[:8]}; "
                              "the checkpoint is inconsistent (re-save it from the model)")
    return out, rope


def _block_layers(state: dict[str, torch.Tensor]) -> list[int]:
    pattern = re.compile(r"^lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _resampler_config(state: dict[str, torch.Tensor], heads: int, what: str) -> dict:
    if "perceiver.latents" not in state:
        raise CheckpointError(f"{what} has no perceiver.latents: is it an InfiMM checkpoint?")
    num_latents, dim = state["perceiver.latents"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    inner = state.get("perceiver.layers.0.0.to_q.weight")
    ff = state.get("perceiver.layers.0.1.1.weight")
    if not depth or inner is None or ff is None or inner.shape[0] % heads or ff.shape[0] % dim:
        raise CheckpointError(f"{what}: the perceiver's weights do not have InfiMM's shapes "
                              f"(depth {depth}, {heads} heads); is perceiver_heads right?")
    return dict(depth=depth, num_latents=int(num_latents), heads=heads, head_dim=inner.shape[0] // heads,
                ff_mult=ff.shape[0] // dim, qk_norm=False, activation="gelu")


def _cross_attention_config(state: dict[str, torch.Tensor], every: int, num_layers: int, heads: int,
                            what: str) -> dict:
    expected = CrossAttentionConfig(every_n_layers=every).layer_indices(num_layers)
    found = _block_layers(state)
    if found != expected:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise CheckpointError(
            f"{what}: cross_attn_every_n_layers={every} places gated cross-attention blocks before decoder layers "
            f"{expected}, but the checkpoint " + (f"has no block before layers {missing}" if missing else "")
            + (" and " if missing and extra else "") + (f"has blocks before layers {extra}" if extra else "")
            + "; is config.json the one the weights were saved with?"
        )
    prefix = f"lang_encoder.model.layers.{expected[0]}.gated_cross_attn_layer."
    to_q, ff = state.get(prefix + "attn.to_q.weight"), state.get(prefix + "ff.1.weight")
    if to_q is None or ff is None or to_q.shape[0] % heads:
        raise CheckpointError(f"{what}: the block before layer {expected[0]} lacks attn.to_q or ff.1, or its "
                              f"width is not a multiple of {heads} heads")
    return dict(every_n_layers=every, heads=heads, head_dim=to_q.shape[0] // heads, qk_norm=False, norm="layer",
                ffn="plain", ffn_dim=ff.shape[0], activation="gelu", gate_init="zeros", gate_shape="scalar",
                ffn_without_image=True, skip_rows_without_image=True, norm_eps=1e-5)


def _text_config(language: dict, lm_type: str | None) -> dict:
    text = {k: v for k, v in language.items() if k not in ("attn_implementation", "_attn_implementation",
                                                            "torch_dtype", "dtype", "transformers_version")}
    model_type = lm_type or text.get("model_type") or ("mistral" if "sliding_window" in text else "llama")
    text["model_type"] = model_type
    return text


def infimm_to_interleaf_config(data: dict, state: dict[str, torch.Tensor], *, perceiver_heads: int = INFIMM_HEADS,
                               xattn_heads: int = INFIMM_HEADS, lm_type: str | None = None,
                               what: str = "InfiMM checkpoint") -> InterleafConfig:
    """The :class:`InterleafConfig` of an InfiMM ``config.json`` (``data``) and its weights (canonical keys).

    ``perceiver_heads`` / ``xattn_heads``: the heads InfiMM's code builds (8); the widths per head come
    from the weights.
    """
    from ..model.eva_clip import eva_vision_config

    for key in ("visual", "language", "cross_attn_every_n_layers", "image_token_id"):
        if key not in data:
            raise ConfigError(key, "is missing from the InfiMM config", "pass the checkpoint's own config.json")
    vision = eva_vision_config(data["visual"])
    text = _text_config(dict(data["language"]), lm_type)
    num_layers = text.get("num_hidden_layers")
    vocab = text.get("vocab_size")
    if not isinstance(num_layers, int) or not isinstance(vocab, int):
        raise ConfigError("language", "needs num_hidden_layers and vocab_size", "pass the checkpoint's own config.json")
    every = data["cross_attn_every_n_layers"]
    image_id = int(data["image_token_id"])
    if not 0 <= image_id < vocab:
        raise ConfigError("image_token_id", f"{image_id} is outside the LM's vocabulary of {vocab}")
    # The LM's rows hold InfiMM's tokens (32000, 32001 in the released vocabularies of 32002): no
    # decoupled rows, so the model is the released architecture, parameter for parameter.
    tokens = TokensConfig(prompt_format="openflamingo", image_token_id=image_id)
    return InterleafConfig(
        vision=dataclasses.asdict(vision),
        resampler=_resampler_config(state, perceiver_heads, what),
        cross_attention=_cross_attention_config(state, every, num_layers, xattn_heads, what),
        tokens=dataclasses.asdict(tokens), text_config=text,
        freeze="flamingo" if data.get("freeze_llm", True) else "unfreeze_lm",
    )


def _check_rope(rope: dict[str, torch.Tensor], model, what: str) -> None:
    """The stored rotary tables must be for this tower's grid and head width (they are recomputed)."""
    tower = model.vision_tower.backbone
    shape = (tower.grid**2, tower.width // tower.heads)
    bad = [k for k, v in rope.items() if tuple(v.shape) != shape] if tower.eva.rope else list(rope)
    if bad:
        raise CheckpointError(f"{what}: rotary tables {bad[:4]} do not fit the tower of config.json "
                              f"(rope {tower.eva.rope}, expected shape {shape})")


def map_from_infimm(state: dict[str, torch.Tensor], model, what: str = "InfiMM checkpoint") -> dict[str, torch.Tensor]:
    """InfiMM's tensors (any of its key paths) renamed to ``model``'s keys, strictly."""
    return _map_canonical(*canonical_state(state, what), model, what)


def _map_canonical(canon: dict[str, torch.Tensor], rope: dict[str, torch.Tensor], model, what: str) -> dict:
    from ..model.lm import find_decoder_layers

    lm = model.language_model
    layers_path, _ = find_decoder_layers(lm, lm.config.num_hidden_layers)
    blocks = model.config.xattn_cfg.layer_indices(lm.config.num_hidden_layers)
    table = openflamingo_key_map(model.config.resampler_cfg.depth, layers_path, blocks)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    decoder = re.compile(r"^lang_encoder\.model\.layers\.(\d+)\.decoder_layer\.(.+)$")
    for key, value in canon.items():
        targets: list[str] = []
        if key in table:
            targets = list(table[key])
        elif key.startswith("vision_encoder."):
            targets = ["vision_tower.backbone." + key[len("vision_encoder."):]]
        elif m := decoder.match(key):
            i, rest = int(m.group(1)), m.group(2)
            targets = [f"language_model.{layers_path}.{i}{'.decoder_layer' if i in blocks else ''}.{rest}"]
        elif key.startswith("lang_encoder.") and ".gated_cross_attn_layer." not in key:
            targets = ["language_model." + key[len("lang_encoder."):]]
        if not targets or any(t not in expected for t in targets):
            unknown.append(key)  # named as the checkpoint names it
            continue
        mapped.update(zip(targets, value.chunk(len(targets), dim=0)))  # to_kv: two targets, split into k, v
    check_keys(mapped, expected, what=what, unmapped=unknown)
    _check_rope(rope, model, what)
    return mapped


# ---------------------------------------------------------------------------------- entry points


def load_infimm(src_dir: PathLike, *, for_saving: bool = False, **options: Any):
    """The interleaf model of an InfiMM folder (``config.json`` + weights), in eval mode.

    ``options``: ``perceiver_heads``, ``xattn_heads``, ``lm_type`` (see :func:`infimm_to_interleaf_config`).
    ``for_saving``: built on the meta device and given the checkpoint's tensors as they are (no second
    copy); such a model's computed buffers stay empty, so it is only for ``save_pretrained``.
    """
    from ..model import InterleafForConditionalGeneration

    src = Path(src_dir).expanduser()
    what = f"InfiMM checkpoint {str(src)!r}"
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} has no config.json; expected an InfiMM checkpoint folder")
    data = read_json(src / "config.json", "InfiMM config", error=CheckpointError)
    canon, rope = canonical_state(read_weights(src), what)
    cfg = infimm_to_interleaf_config(data, canon, what=what, **options)
    if for_saving:
        with torch.device("meta"):
            model = InterleafForConditionalGeneration(cfg)
        fill_meta_model(model, _map_canonical(canon, rope, model, what), what=what)
    else:
        model = InterleafForConditionalGeneration(cfg)
        model.load_state_dict(_map_canonical(canon, rope, model, what), strict=True)
    model.apply_freeze()
    return model.eval()


def _tokenizer(src: Path, tokenizer: Any, tokens: TokensConfig):
    tok = optional_tokenizer(src, tokenizer)
    if tok is None:
        return None
    got = tok.convert_tokens_to_ids(tokens.image_token) if tokens.image_token in tok.get_vocab() else None
    if got != tokens.image_token_id or tokens.end_of_chunk_token not in tok.get_vocab():
        raise CheckpointError(f"the tokenizer gives {tokens.image_token!r} the id {got} (config.json: "
                              f"{tokens.image_token_id}) or lacks {tokens.end_of_chunk_token!r}: use the "
                              "checkpoint's own tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def from_infimm(src_dir: PathLike, dst_dir: PathLike, *, tokenizer: Any = None, **options: Any) -> Path:
    """Convert an InfiMM folder into an interleaf directory; returns ``dst_dir``.

    With tokenizer files in ``src_dir`` (or ``tokenizer``) the directory gets the processor too and
    :func:`interleaf.load` reads it; without, only the model is written
    (``InterleafForConditionalGeneration.from_pretrained`` reads it). ``options`` as :func:`load_infimm`.
    """
    from ..api import save
    from ..processing import ImageTransform, InterleafProcessor

    src = Path(src_dir).expanduser()
    model = load_infimm(src, for_saving=True, **options)
    tok = _tokenizer(src, tokenizer, model.config.tokens_cfg)
    dst = Path(dst_dir)
    if tok is None:
        dst.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(dst)
        return dst
    # InfiMM's processor: images under its name and shape (batch_images), an empty system turn first
    processor = InterleafProcessor(
        tok, model.config.tokens_cfg, ImageTransform.from_vision_config(model.config.vision_cfg),
        max_length=getattr(model.config.text_config, "max_position_embeddings", None),
        images_key="batch_images", default_system="",
    )
    return save(model, processor, dst, card={"converted_from": src})
