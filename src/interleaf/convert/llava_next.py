"""LLaVA-NeXT (transformers' ``LlavaNextForConditionalGeneration``) <-> interleaf, both ways, offline.

LLaVA-NeXT is LLaVA (:mod:`interleaf.convert.llava`: CLIP tower, two-layer MLP projector, one
``<image>`` per vision token written over by the features) with any-resolution tiling:

============================================  ==================================================
LLaVA-NeXT                                    interleaf
============================================  ==================================================
everything LLaVA has                          as in :mod:`interleaf.convert.llava`
``image_grid_pinpoints`` (height, width)      ``insertion.anyres.grids`` (convention ``llava_next``)
``vision_config.image_size`` / ``patch_size`` ``insertion.anyres.base_size`` / ``patch_size``
``image_newline`` (LM width)                  ``projector.image_newline``
============================================  ==================================================

Weights are read in either hub layout transformers reads: llava-hf's (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
``image_newline``) and transformers 5's module names (``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.image_newline``,
``lm_head.*``). A key the tables do not know, a missing one or a mis-shaped one is an error
listing them. :func:`to_llava_next` writes a directory ``LlavaNextForConditionalGeneration`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import InterleafConfig
from ..errors import ConfigError
from .llava import (
    _FROM_LLAVA,
    _TO_LLAVA,
    _rename,
    _require,
    export_llava_family,
    import_llava_family,
    llava_to_interleaf_config,
)

__all__ = [
    "from_llava_next", "interleaf_to_llava_next_config", "llava_next_to_interleaf_config", "map_from_llava_next",
    "to_llava_next",
]

PathLike = str | Path

# LLaVA's tables with the newline first (its interleaf name starts with "projector.", which LLaVA maps too).
_FROM_LLAVA_NEXT = (("model.image_newline", "projector.image_newline"), ("image_newline", "projector.image_newline"),
                    *_FROM_LLAVA)
_TO_LLAVA_NEXT = (("projector.image_newline", "model.image_newline"), *_TO_LLAVA)


def map_from_llava_next(state: dict[str, torch.Tensor], what: str = "LLaVA-NeXT checkpoint") -> dict[str, torch.Tensor]:
    """LLaVA-NeXT weights (either hub layout) renamed to interleaf's; unknown keys are an error listing them."""
    return _rename(state, _FROM_LLAVA_NEXT, what)


def llava_next_to_interleaf_config(next_config, tokenizer=None, preprocessor: dict | None = None) -> InterleafConfig:
    """The :class:`InterleafConfig` computing what ``LlavaNextForConditionalGeneration(next_config)`` does."""
    if next_config.vision_feature_select_strategy != "default":
        raise ConfigError(
            "vision_feature_select_strategy", f"LLaVA-NeXT packs a grid of patch tokens per view, so the class "
            f"token must be dropped ('default'), got {next_config.vision_feature_select_strategy!r}",
            "only 'default' LLaVA-NeXT models can run (transformers' own model cannot run 'full' either)",
        )
    config = llava_to_interleaf_config(next_config, tokenizer, preprocessor)
    v = next_config.vision_config
    grids = [list(g) for g in next_config.image_grid_pinpoints]
    crops = max((a // v.image_size) * (b // v.image_size) for a, b in grids)
    config.insertion = dict(placement="expand", anyres=dict(
        convention="llava_next", base_size=v.image_size, patch_size=v.patch_size, grids=grids, max_crops=crops))
    return config


def interleaf_to_llava_next_config(config: InterleafConfig):
    """The ``LlavaNextConfig`` of an interleaf model; a :class:`ConfigError` names what LLaVA-NeXT cannot express."""
    from transformers import LlavaNextConfig

    from .llava import interleaf_to_llava_config

    tiles = config.insertion_cfg.anyres
    _require(tiles is not None and tiles.convention == "llava_next", "insertion.anyres",
             "LLaVA-NeXT tiles each image (insertion.anyres with convention llava_next)")
    _require(config.vision_cfg.drop_cls_token, "vision.drop_cls_token", "LLaVA-NeXT drops CLIP's class token")
    llava = interleaf_to_llava_config(config)
    data = {k: v for k, v in llava.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    data["image_grid_pinpoints"] = [list(g) for g in tiles.grids]
    return LlavaNextConfig(**data)


def from_llava_next(src_dir: PathLike, dst_dir: PathLike, *, tokenizer: Any = None) -> Path:
    """Convert a transformers LLaVA-NeXT directory (either hub layout) into an interleaf directory.

    ``src_dir`` is what ``LlavaNextForConditionalGeneration.save_pretrained`` (and its processor's
    ``save_pretrained``) wrote, or a llava-hf download; ``tokenizer`` overrides where the
    tokenizer comes from. Returns ``dst_dir``, which :func:`interleaf.load` reads.
    """
    from transformers import LlavaNextConfig

    return import_llava_family(src_dir, dst_dir, tokenizer, model_type="llava_next", config_class=LlavaNextConfig,
                               to_config=llava_next_to_interleaf_config, key_map=map_from_llava_next,
                               name="LLaVA-NeXT", hints={"llava": "; use `interleaf convert llava` for it"})


def to_llava_next(src_dir: PathLike, dst_dir: PathLike) -> Path:
    """Convert an interleaf directory with LLaVA-NeXT's architecture into a transformers LLaVA-NeXT directory.

    Writes ``LlavaNextForConditionalGeneration.save_pretrained`` output plus the tokenizer.
    """
    from transformers import LlavaNextForConditionalGeneration

    return export_llava_family(src_dir, dst_dir, interleaf_to_llava_next_config, LlavaNextForConditionalGeneration,
                               _TO_LLAVA_NEXT, "LLaVA-NeXT")
