"""xGen-MM (BLIP-3) r-v1.5 released checkpoints -> interleaf, offline.

The released layout (``XGenMMModelForConditionalGeneration``, everything under ``vlm.``) and where each
part goes::

    released                                            interleaf
    vlm.vision_encoder.*  (SiglipVisionTransformer)     vision_tower.backbone.tower.*  (SiglipVisionModel keys)
    vlm.vision_tokenizer.* (perceiver token sampler)    projector.*   (table in :mod:`.xgenmm_keys`)
    vlm.lang_model.model.embed_tokens.weight            language_model.model.embed_tokens.weight
    vlm.lang_model.model.embed_tokens.additional_embedding.weight
                                                        language_model.model.embed_tokens.extra   (3 added rows)
    vlm.lang_model.lm_head.weight / .bias               language_model.lm_head.weight / .bias
    vlm.lang_model.lm_head.additional_fc.weight / .bias language_model.lm_head.extra / .extra_bias
    vlm.lang_model.*  (the rest: Phi3ForCausalLM)       language_model.*

The config: the released ``config.json`` (``model_type: xgenmm``) names little and relies on its classes'
defaults (SigLIP so400m/14 at 384 px, a 6-layer sampler of 128 latents with 16 heads x 96, Phi-3-mini);
those defaults are written out below. A folder whose ``config.json`` spells every dimension out
(``vision_encoder``, ``vision_tokenizer``, ``text_config``, ``initial_tokenizer_len``, as the reference
fixtures do) is read as it says. The mode: ``instruct`` (one ``<image>`` per image, replaced by the
image's anyres tokens) or ``base`` (``<image>`` + placeholders overwritten by one view's tokens); by
default the config's ``image_aspect_ratio`` decides (``anyres``: instruct). The released base checkpoint's
config also says ``anyres`` although its code never tiles: convert it with ``mode="base"``.

Weights are read from safetensors only (``model.safetensors`` or shards with their index): every key is
mapped by the table, and a missing, unexpected or mis-shaped key is one error listing them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from ..config import SIGLIP_MEAN, SIGLIP_STD, InterleafConfig, TokensConfig
from ..errors import CheckpointError, ConfigError
from ..files import read_json
from ._common import _listing, check_keys, fill_meta_model, optional_tokenizer
from .xgenmm_keys import XGENMM_SAMPLER_PREFIX, sampler_state_from_xgenmm

__all__ = ["XGENMM_SPECIAL_TOKENS", "from_xgenmm", "map_from_xgenmm", "read_xgenmm_weights",
           "xgenmm_to_interleaf_config"]

PathLike = str | Path
# The preset whose chat template, stop token (<|end|>) and pad token an instruct conversion gets.
XGENMM_INSTRUCT_PRESET = "xgen-mm-phi3-mini"
RELEASED_INITIAL_TOKENIZER_LEN = 32012  # the released vocabulary, whose ids the preset's generation ids are
Mode = Literal["auto", "instruct", "base"]

# The tokens xGen-MM adds at load time, in this order, from initial_tokenizer_len on.
XGENMM_SPECIAL_TOKENS = ("<image>", "<image placeholder>", "<|endofchunk|>")
# google/siglip-so400m-patch14-384's vision config (the released code loads it by name).
SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_channels=3,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    vision_use_head=True,
)
# The released PerceiverResampler's code defaults (XGenMMVisionTokenizerConfig gives the widths and latents).
SAMPLER_DEFAULTS = dict(dim=1152, dim_inner=3072, num_latents=128, depth=6, heads=16, dim_head=96, ff_mult=4)
_VISION_FIELDS = tuple(SIGLIP_SO400M_384)
_VISION = "vlm.vision_encoder."
_LM = "vlm.lang_model."
_LM_RENAMES = {  # the decoupled rows and the head's bias, under _LM
    "model.embed_tokens.additional_embedding.weight": "language_model.model.embed_tokens.extra",
    "lm_head.additional_fc.weight": "language_model.lm_head.extra",
    "lm_head.additional_fc.bias": "language_model.lm_head.extra_bias",
}


# ---------------------------------------------------------------------------------- config


def _sections(data: dict) -> tuple[dict, dict, dict, int, str, list | None]:
    """(vision, sampler, text, initial_tokenizer_len, image_aspect_ratio, grids (W, H) or None) of a config."""
    if data.get("model_type") == "xgenmm":  # the released XGenMMConfig: defaults written out
        text = dict(data.get("text_config") or {})
        vision_enc = data.get("vision_encoder_config") or {}
        tok = data.get("vision_tokenizer_config") or {}
        sampler = dict(SAMPLER_DEFAULTS)
        sampler.update(dim=tok.get("vis_feature_dim", 1152), dim_inner=tok.get("lang_embedding_dim", 3072),
                       num_latents=tok.get("num_vis_tokens", 128))
        ratio = vision_enc.get("image_aspect_ratio", "anyres")
        grids = vision_enc.get("anyres_grids")
        return dict(SIGLIP_SO400M_384), sampler, text, int(text.get("initial_tokenizer_len", 32012)), ratio, grids
    needed = ("vision_encoder", "vision_tokenizer", "text_config", "initial_tokenizer_len")
    missing = [k for k in needed if k not in data]
    if missing:
        raise ConfigError(
            missing[0], "is missing from the xGen-MM config",
            "pass the checkpoint's own config.json (model_type 'xgenmm'), or one that spells out vision_encoder, "
            "vision_tokenizer, text_config and initial_tokenizer_len",
        )
    vision = {k: v for k, v in data["vision_encoder"].items() if k in _VISION_FIELDS}
    sampler = {**SAMPLER_DEFAULTS, **data["vision_tokenizer"]}
    return (vision, sampler, dict(data["text_config"]), int(data["initial_tokenizer_len"]),
            data.get("image_aspect_ratio", "none"), data.get("anyres_grids_px_w_h"))


def xgenmm_to_interleaf_config(data: dict, mode: Mode = "auto") -> InterleafConfig:
    """The :class:`InterleafConfig` computing what the xGen-MM model of ``data`` (its config.json) does."""
    vision, sampler, text, initial, ratio, grids = _sections(data)
    if mode == "auto":
        mode = "instruct" if ratio == "anyres" else "base"
    if mode not in ("instruct", "base"):
        raise ConfigError("mode", f"must be 'auto', 'instruct' or 'base', got {mode!r}")
    if sampler.get("max_num_media") or sampler.get("max_num_frames"):
        raise ConfigError("vision_tokenizer", "media or frame embeddings are not part of xGen-MM r-v1.5's sampler")
    text.pop("initial_tokenizer_len", None)
    text.pop("torch_dtype", None)
    text.setdefault("model_type", "phi3")
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    num_latents = int(sampler["num_latents"])
    tokens = TokensConfig(
        prompt_format="llava", image_token=XGENMM_SPECIAL_TOKENS[0], image_token_id=initial,
        image_seq_length=num_latents if mode == "base" else 1, extra_start=initial, num_extra=3,
        image_placeholder_token_id=initial + 1 if mode == "base" else None, decoupled_head="xgenmm",
    )
    insertion: dict[str, Any] = dict(placement="expand")
    if mode == "instruct":
        anyres = dict(convention="xgenmm", base_size=size, patch_size=patch)
        if grids:
            anyres["grids"] = [tuple(g) for g in grids]
        insertion = dict(placement="replace", anyres=anyres)
    return InterleafConfig(
        fusion="token_insertion",
        vision=dict(kind="siglip", hf_config=vision, feature_layer=-1, post_layernorm=True,
                    image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, resize="squash"),
        projector=dict(kind="token_sampler", token_sampler=dict(
            dim=int(sampler["dim"]), out_dim=int(sampler["dim_inner"]), depth=int(sampler["depth"]),
            num_latents=num_latents, heads=int(sampler["heads"]), head_dim=int(sampler["dim_head"]),
            ff_mult=int(sampler["ff_mult"]))),
        insertion=insertion,
        tokens=dataclasses.asdict(tokens),
        text_config=text,
        freeze="projector_lm",
    )


# ---------------------------------------------------------------------------------- weights


def read_xgenmm_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: ``model.safetensors`` or the shards its index names (never pickles)."""
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        raise CheckpointError(
            f"{str(directory)!r} holds no model.safetensors nor model.safetensors.index.json"
            + (f" (found {pickles}: interleaf reads xGen-MM weights from safetensors only)" if pickles else "")
        )
    weight_map = read_json(index, "weight index", error=CheckpointError).get("weight_map") or {}
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        if not (directory / name).is_file():
            raise CheckpointError(f"{str(index)!r} names {name!r}, which is not in {str(directory)!r}")
        state.update(load_file(str(directory / name)))
    return state


def map_from_xgenmm(state: dict[str, torch.Tensor], model, what: str = "xGen-MM checkpoint") -> dict[str, torch.Tensor]:
    """The released tensors renamed to ``model``'s keys, strictly (one error lists every bad key)."""
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(_VISION):
            mapped["vision_tower.backbone.tower." + key[len(_VISION):]] = value
        elif key.startswith(_LM):
            rest = key[len(_LM):]
            mapped[_LM_RENAMES.get(rest, "language_model." + rest)] = value
        elif not key.startswith(XGENMM_SAMPLER_PREFIX):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{what}: " + _listing("keys outside vlm.vision_encoder, vlm.vision_tokenizer and "
                                                     "vlm.lang_model", unknown) + "; is it an xGen-MM checkpoint?")
    sampler = sampler_state_from_xgenmm(state, model.projector, what=what)
    mapped.update({"projector." + k: v for k, v in sampler.items()})
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(mapped, expected, what=what)
    return mapped


def load_xgenmm(src_dir: PathLike, mode: Mode = "auto", *, for_saving: bool = False):
    """The interleaf model of an xGen-MM folder (config.json + safetensors).

    ``for_saving``: build on the meta device and take the checkpoint's tensors as they are (no second
    copy in memory); such a model's computed buffers (rotary frequencies, position ids) stay empty, so it
    is only for ``save_pretrained``. Otherwise the model is built on the CPU and loaded strictly.
    """
    from ..model import InterleafForConditionalGeneration

    src = Path(src_dir).expanduser()
    what = f"xGen-MM checkpoint {str(src)!r}"
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} has no config.json; expected a released xGen-MM folder")
    cfg = xgenmm_to_interleaf_config(read_json(src / "config.json", "xGen-MM config", error=CheckpointError), mode)
    state = read_xgenmm_weights(src)
    if for_saving:
        with torch.device("meta"):
            model = InterleafForConditionalGeneration(cfg)
        fill_meta_model(model, map_from_xgenmm(state, model, what), what=what)
    else:
        model = InterleafForConditionalGeneration(cfg)
        model.load_state_dict(map_from_xgenmm(state, model, what), strict=True)
    model.apply_freeze()
    return model.eval()


def _tokenizer(src: Path, tokenizer: Any, initial: int):
    tok = optional_tokenizer(src, tokenizer)
    if tok is None:
        return None
    missing = [t for t in XGENMM_SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        if len(tok) != initial or len(missing) != len(XGENMM_SPECIAL_TOKENS):
            raise CheckpointError(f"the tokenizer has {len(tok)} tokens and lacks {missing}; xGen-MM adds "
                                  f"{list(XGENMM_SPECIAL_TOKENS)} at ids {initial}.. (initial_tokenizer_len)")
        tok.add_special_tokens({"additional_special_tokens": list(XGENMM_SPECIAL_TOKENS)},
                               replace_extra_special_tokens=False)
    ids = [tok.convert_tokens_to_ids(t) for t in XGENMM_SPECIAL_TOKENS]
    if ids != list(range(initial, initial + 3)):
        raise CheckpointError(f"the tokenizer gives {list(XGENMM_SPECIAL_TOKENS)} the ids {ids}, the checkpoint "
                              f"expects {list(range(initial, initial + 3))}: use the checkpoint's own tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def from_xgenmm(src_dir: PathLike, dst_dir: PathLike, *, tokenizer: Any = None, mode: Mode = "auto") -> Path:
    """Convert a released xGen-MM folder into an interleaf directory; returns ``dst_dir``.

    ``src_dir`` holds ``config.json``, the weights (``model.safetensors`` or shards with their index) and,
    if present, the tokenizer files (or pass ``tokenizer``). With a tokenizer the directory gets the
    processor too and :func:`interleaf.load` reads it; without one only the model is written
    (``InterleafForConditionalGeneration.from_pretrained`` reads it).

    An instruct conversion (not ``mode="base"``) also gets the instruct checkpoints' prompting: the chat
    template (system turn, ``"<image> "`` per image in the user's content, no BOS) on the tokenizer,
    ``<|end|>`` as the tokenizer's eos token and the generation config's ``eos_token_id`` (when the tokenizer
    has it), and the tokenizer's pad token as the generation config's ``pad_token_id``; without a tokenizer the
    released ids (32007, 32011) go into the generation config of a checkpoint with the released vocabulary.
    """
    from ..api import apply_prompting, processor_for, save

    src = Path(src_dir).expanduser()
    model = load_xgenmm(src, mode, for_saving=True)
    tok = _tokenizer(src, tokenizer, model.config.tokens_cfg.extra_start)
    released_vocab = model.config.tokens_cfg.extra_start == RELEASED_INITIAL_TOKENIZER_LEN
    if model.config.insertion_cfg.anyres is not None and (tok is not None or released_vocab):
        apply_prompting(model, tok, XGENMM_INSTRUCT_PRESET)  # instruct: its chat template, stop and pad tokens
    dst = Path(dst_dir)
    if tok is None:
        dst.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(dst)
        return dst
    return save(model, processor_for(model.config, tok), dst, card={"converted_from": src})
