"""LLaVA (transformers' ``LlavaForConditionalGeneration``) <-> interleaf, both ways, offline.

The correspondence (an interleaf ``fusion: token_insertion`` model with ``expand`` placement):

============================================  ==================================================
LLaVA                                         interleaf
============================================  ==================================================
``vision_tower`` (CLIP)                       ``vision.kind: clip``, ``vision.hf_config``
``vision_feature_layer`` (int or list)        ``vision.feature_layer``
``vision_feature_select_strategy``            ``vision.drop_cls_token`` (``default``: true, ``full``: false)
``multi_modal_projector.linear_{1,2}``        ``projector.linear_{1,2}`` (``kind: mlp2x_gelu``)
``projector_hidden_act``, ``..._bias``        ``projector.activation``, ``projector.bias``
``image_token_index``, ``image_seq_length``   ``tokens.image_token_id``, ``tokens.image_seq_length``
``text_config`` + the LM's weights            ``text_config``, ``language_model.*``
============================================  ==================================================

Weights are read in either hub layout: llava-hf's (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*`` or ``vision_tower.*``,
``multi_modal_projector.*``) and transformers 5's module names (``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.*``). Every key is
mapped by the table below; a key the table does not know, a missing one or a mis-shaped one is an
error listing them. :func:`to_llava` writes a directory ``LlavaForConditionalGeneration`` loads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import CLIP_MEAN, CLIP_STD, InterleafConfig, TokensConfig, VisionConfig
from ..errors import CheckpointError, ConfigError
from ._common import check_keys, checkpoint_tokenizer, expected_shapes, fill_meta_model, read_json, read_weights

__all__ = ["from_llava", "interleaf_to_llava_config", "llava_to_interleaf_config", "map_from_llava", "to_llava"]

PathLike = str | Path

# (LLaVA prefix, interleaf prefix), the first match wins: both hub layouts, old and new names.
_FROM_LLAVA = (
    ("model.vision_tower.vision_model.", "vision_tower.backbone.tower."),
    ("model.vision_tower.", "vision_tower.backbone.tower."),
    ("vision_tower.vision_model.", "vision_tower.backbone.tower."),
    ("vision_tower.", "vision_tower.backbone.tower."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
)
# interleaf prefix -> transformers 5's module names (what LlavaForConditionalGeneration holds)
_TO_LLAVA = (
    ("vision_tower.backbone.tower.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def _rename(state: dict[str, torch.Tensor], table, what: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in state.items():
        for src, dst in table:
            if key.startswith(src):
                new = dst + key[len(src):]
                if new in out:
                    raise CheckpointError(f"{what}: {key!r} and another key both map to {new!r}")
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        check_keys(out, {k: v.shape for k, v in out.items()}, what=what, unmapped=unknown)
    return out


def map_from_llava(state: dict[str, torch.Tensor], what: str = "LLaVA checkpoint") -> dict[str, torch.Tensor]:
    """LLaVA weights (either hub layout) renamed to interleaf's; unknown keys are an error listing them."""
    return _rename(state, _FROM_LLAVA, what)


# ---------------------------------------------------------------------------------- configs


def llava_to_interleaf_config(llava_config, tokenizer=None, preprocessor: dict | None = None) -> InterleafConfig:
    """The :class:`InterleafConfig` computing what ``LlavaForConditionalGeneration(llava_config)`` does."""
    v = llava_config.vision_config
    if v.model_type != "clip_vision_model":
        raise ConfigError(
            "vision_config.model_type", f"interleaf converts LLaVA models with a CLIP tower, got {v.model_type!r}"
        )
    strategy = llava_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ConfigError("vision_feature_select_strategy", f"must be 'default' or 'full', got {strategy!r}")
    layer = llava_config.vision_feature_layer
    pre = preprocessor or {}
    vision = VisionConfig(
        kind="clip", hf_config=v.to_dict(), feature_layer=list(layer) if isinstance(layer, (list, tuple)) else layer,
        drop_cls_token=strategy == "default", post_layernorm=False,
        image_mean=tuple(pre.get("image_mean") or CLIP_MEAN), image_std=tuple(pre.get("image_std") or CLIP_STD),
        resize="shortest_edge_crop" if pre.get("do_center_crop", True) else "squash",
    )
    image_id = int(llava_config.image_token_id)
    image_token = "<image>"
    if tokenizer is not None:
        image_token = tokenizer.convert_ids_to_tokens(image_id)
        if image_token is None or tokenizer.convert_tokens_to_ids(image_token) != image_id:
            raise CheckpointError(
                f"the tokenizer has no token with id {image_id} (LLaVA's image_token_index); "
                "use the tokenizer saved with the LLaVA checkpoint"
            )
    per_image = (v.image_size // v.patch_size) ** 2 + (1 if strategy == "full" else 0)
    tokens = TokensConfig(prompt_format="llava", image_token=image_token, image_token_id=image_id,
                          image_seq_length=per_image)
    t = llava_config.text_config
    return InterleafConfig(
        fusion="token_insertion",
        vision=vision,
        projector=dict(kind="mlp2x_gelu", bias=bool(getattr(llava_config, "multimodal_projector_bias", True)),
                       activation=llava_config.projector_hidden_act),
        insertion=dict(placement="expand"),
        tokens=dataclasses.asdict(tokens),
        text_config=t.to_dict(),
        freeze="projector",
        pad_token_id=getattr(t, "pad_token_id", None),
        bos_token_id=getattr(t, "bos_token_id", None),
        eos_token_id=getattr(t, "eos_token_id", None),
    )


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise ConfigError(
            field, problem, "only models with LLaVA's architecture convert to LLaVA (e.g. ones made by from_llava)"
        )


def interleaf_to_llava_config(config: InterleafConfig):
    """The ``LlavaConfig`` of an interleaf model; a :class:`ConfigError` names what LLaVA cannot express."""
    from transformers import CLIPVisionConfig, LlavaConfig

    v, p, k = config.vision_cfg, config.projector_cfg, config.tokens_cfg
    _require(config.fusion == "token_insertion", "fusion", f"LLaVA inserts image tokens, got {config.fusion!r}")
    _require(config.insertion_cfg.placement == "expand", "insertion.placement", "LLaVA expands <image> in the text")
    _require(p.kind == "mlp2x_gelu", "projector.kind", f"LLaVA's projector is a two-layer MLP, got {p.kind!r}")
    _require(v.kind == "clip", "vision.kind", f"LLaVA's tower here is CLIP, got {v.kind!r}")
    _require(not v.post_layernorm, "vision.post_layernorm", "LLaVA reads CLIP's hidden states before the final norm")
    _require(not k.num_extra, "tokens.num_extra", "LLaVA has no decoupled token rows")
    hf = {key: value for key, value in v.hf_config.items() if key not in ("transformers_version", "architectures")}
    layer = v.feature_layer
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**{key: value for key, value in hf.items() if key != "model_type"}),
        text_config=config.text_config.to_dict(),
        image_token_index=k.image_token_id,
        projector_hidden_act=p.activation,
        vision_feature_select_strategy="default" if v.drop_cls_token else "full",
        vision_feature_layer=list(layer) if isinstance(layer, (list, tuple)) else layer,
        image_seq_length=k.image_seq_length,
        multimodal_projector_bias=p.bias,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------------- files


def _tokenizer(directory: Path, tokenizer: Any):
    return checkpoint_tokenizer(directory, tokenizer, "LLaVA")


def _preprocessor(directory: Path) -> dict | None:
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (directory / name).is_file():
            data = read_json(directory / name)
            section = data.get("image_processor", data) if name == "processor_config.json" else data
            if isinstance(section, dict) and ("image_mean" in section or "crop_size" in section):
                return section
    return None


def from_llava(src_dir: PathLike, dst_dir: PathLike, *, tokenizer: Any = None) -> Path:
    """Convert a transformers LLaVA directory (either hub layout) into an interleaf directory.

    ``src_dir`` is what ``LlavaForConditionalGeneration.save_pretrained`` (and its processor's
    ``save_pretrained``) wrote, or a llava-hf download; ``tokenizer`` overrides where the
    tokenizer comes from. Returns ``dst_dir``, which :func:`interleaf.load` reads.
    """
    from transformers import LlavaConfig

    return import_llava_family(src_dir, dst_dir, tokenizer, model_type="llava", config_class=LlavaConfig,
                               to_config=llava_to_interleaf_config, key_map=map_from_llava, name="LLaVA")


def import_llava_family(src_dir: PathLike, dst_dir: PathLike, tokenizer: Any, *, model_type: str, config_class,
                        to_config, key_map, name: str, hints: dict[str, str] | None = None) -> Path:
    """Read a transformers LLaVA-family directory (``model_type``, its ``config_class``), translate its
    config (``to_config``) and weights (``key_map``, every key checked) and save it as interleaf's.
    ``hints``: advice by the model_type found instead (e.g. the other family's converter)."""
    from ..api import save
    from ..model import InterleafForConditionalGeneration
    from ..processing import ImageTransform, InterleafProcessor

    src = Path(src_dir).expanduser()
    what = f"{name} checkpoint {str(src)!r}"
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} is not a {name} save_pretrained directory (no config.json)")
    found = read_json(src / "config.json").get("model_type")
    if found != model_type:
        raise CheckpointError(
            f"{str(src / 'config.json')!r} has model_type {found!r}, expected {model_type!r}{(hints or {}).get(found, '')}"
        )
    foreign_config = config_class.from_pretrained(str(src), local_files_only=True)
    tok = _tokenizer(src, tokenizer)
    config = to_config(foreign_config, tok, _preprocessor(src))
    mapped = key_map(read_weights(src), what)
    if "language_model.lm_head.weight" not in mapped and foreign_config.text_config.tie_word_embeddings:
        mapped["language_model.lm_head.weight"] = mapped.get("language_model.model.embed_tokens.weight")
    with torch.device("meta"):
        model = InterleafForConditionalGeneration(config)
    fill_meta_model(model, mapped, what=what)
    model.apply_freeze()
    processor = InterleafProcessor(
        tok, config.tokens_cfg, ImageTransform.from_vision_config(config.vision_cfg),
        max_length=getattr(config.text_config, "max_position_embeddings", None), anyres=config.insertion_cfg.anyres,
    )
    return save(model.eval(), processor, dst_dir, card={"converted_from": src})


def to_llava(src_dir: PathLike, dst_dir: PathLike) -> Path:
    """Convert an interleaf directory with LLaVA's architecture into a transformers LLaVA directory.

    Writes ``LlavaForConditionalGeneration.save_pretrained`` output plus the tokenizer.
    """
    from transformers import LlavaForConditionalGeneration

    return export_llava_family(src_dir, dst_dir, interleaf_to_llava_config, LlavaForConditionalGeneration,
                               _TO_LLAVA, "LLaVA")


def export_llava_family(src_dir: PathLike, dst_dir: PathLike, to_config, model_class, table, name: str) -> Path:
    """Write the interleaf directory ``src_dir`` as a transformers ``model_class`` directory (LLaVA or
    LLaVA-NeXT): ``to_config`` translates the config, ``table`` renames the weights; every key checked."""
    from ..processing import InterleafProcessor

    src = Path(src_dir).expanduser()
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{str(src)!r} is not an interleaf directory (no config.json)")
    config = InterleafConfig.from_pretrained(str(src), local_files_only=True)
    foreign_config = to_config(config)
    tied = foreign_config.tie_word_embeddings
    state = read_weights(src)
    if tied:
        state.pop("language_model.lm_head.weight", None)
    mapped = _rename(state, table, f"interleaf model {str(src)!r}")
    with torch.device("meta"):
        model = model_class(foreign_config)
    expected = expected_shapes(model)
    if tied:
        expected.pop("lm_head.weight", None)
    check_keys(mapped, expected, what=f"interleaf model {str(src)!r} as {name}")
    model.load_state_dict(mapped, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    InterleafProcessor.from_pretrained(src).tokenizer.save_pretrained(str(dst))
    return dst
