"""open_clip's ViT image tower -> interleaf's CLIP tower (a transformers ``CLIPVisionModel``).

OpenFlamingo takes its vision tower from open_clip, whose state dict names the same ViT
differently from transformers. A directory in open_clip's hub layout holds
``open_clip_config.json`` (``{"model_cfg": {"vision_cfg": ...}, "preprocess_cfg": ...}``) and
``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``, read with
``weights_only=True``): the whole CLIP model, whose ``visual.*`` tensors are the image tower. The
text tower's tensors are not used (OpenFlamingo never runs it) and are skipped.

The key table (``V`` = ``visual.``, ``R`` = ``V transformer.resblocks.{i}.``, ``E`` = ``encoder.layers.{i}.``;
the targets are the vision transformer's own names, ``vision_model.`` less)::

    V conv1.weight                embeddings.patch_embedding.weight     (no bias in either)
    V class_embedding             embeddings.class_embedding
    V positional_embedding        embeddings.position_embedding.weight
    V ln_pre                      pre_layrnorm                          (weight, bias)
    R ln_1 / ln_2                 E layer_norm1 / layer_norm2           (weight, bias)
    R attn.in_proj_weight / _bias E self_attn.q_proj | k_proj | v_proj  (rows split in three)
    R attn.out_proj               E self_attn.out_proj                  (weight, bias)
    R mlp.c_fc / mlp.c_proj       E mlp.fc1 / mlp.fc2                   (weight, bias)
    V ln_post                     post_layernorm                        (weight, bias)
    V proj                        (not kept: the image-text projection of the pooled token)

The activation is exact GELU unless the model config says ``quick_gelu``; LayerNorm eps is
open_clip's 1e-5. Towers open_clip builds differently (ResNets, timm or Hugging Face trunks,
layer scale, attentional pooling, no ``ln_pre``, fixed sin-cos positions, other norm or activation
arguments) are refused by name rather than converted wrongly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..config import CLIP_MEAN, CLIP_STD, VisionConfig
from ..errors import CheckpointError
from ..files import read_json
from ._common import check_keys, load_pickle

__all__ = ["OPEN_CLIP_CONFIG", "is_open_clip_dir", "load_open_clip_vision", "open_clip_key_map", "open_clip_vision_config"]

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# vision_cfg fields whose values do not change the ViT's patch tokens at inference
_HARMLESS = {"patch_dropout", "output_tokens", "output_dim", "global_average_pool", "pool_type",
             "final_ln_after_pool", "n_queries", "attn_pooler_queries", "attn_pooler_heads", "embed_cls"}
# vision_cfg fields supported only at these values (open_clip's defaults)
_DEFAULTS: dict[str, Any] = {"ls_init_value": None, "input_patchnorm": False, "attentional_pool": False,
                             "no_ln_pre": False, "pos_embed_type": "learnable", "timm_model_name": None,
                             "hf_model_name": None, "act_kwargs": None, "norm_kwargs": None, "block_type": None}
_SHAPES = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def is_open_clip_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory in open_clip's hub layout (it has ``open_clip_config.json``)."""
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


def _side(value: Any, name: str, what: str) -> int:
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{what}: vision_cfg.{name} must be a positive integer (square), got {value!r}")
    return value


def open_clip_vision_config(model_cfg: dict, what: str = "open_clip config") -> dict:
    """The ``CLIPVisionConfig`` (as a dict) of open_clip's ``model_cfg`` ViT image tower."""
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, dict):
        raise CheckpointError(f"{what}: model_cfg has no vision_cfg dict; is it an open_clip model config?")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise CheckpointError(f"{what}: vision_cfg.layers is a list (a ResNet image tower); only ViT towers convert")
    unsupported = sorted(k for k in vision if k not in _SHAPES | _HARMLESS | set(_DEFAULTS))
    unsupported += sorted(f"{k}={vision[k]!r}" for k in _DEFAULTS if vision.get(k, _DEFAULTS[k]) not in (_DEFAULTS[k], {}))
    if unsupported:
        raise CheckpointError(
            f"{what}: open_clip vision_cfg settings interleaf's CLIP tower does not reproduce: {unsupported}; "
            "only plain open_clip ViTs (learned positions, ln_pre, no layer scale, a transformer trunk) convert"
        )
    width, layers = vision.get("width", 768), vision.get("layers", 12)
    head_width = vision.get("head_width", 64)
    if not all(isinstance(v, int) and v > 0 for v in (width, layers, head_width)) or width % head_width:
        raise CheckpointError(f"{what}: vision_cfg width {width!r} must be a multiple of head_width {head_width!r}")
    mlp = width * vision.get("mlp_ratio", 4.0)
    if mlp != int(mlp):
        raise CheckpointError(f"{what}: vision_cfg.mlp_ratio gives a non-integer MLP width {mlp}")
    return {
        "hidden_size": width, "intermediate_size": int(mlp), "num_hidden_layers": layers,
        "num_attention_heads": width // head_width, "num_channels": 3,
        "image_size": _side(vision.get("image_size", 224), "image_size", what),
        "patch_size": _side(vision.get("patch_size", 16), "patch_size", what),
        "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "layer_norm_eps": 1e-5, "projection_dim": int(model_cfg.get("embed_dim", 512)),
    }


def open_clip_key_map(layers: int) -> dict[str, tuple[str, ...]]:
    """open_clip key -> CLIP vision transformer key(s) (transformers' names); three targets mean "split the rows in three"."""
    out: dict[str, tuple[str, ...]] = {
        "visual.conv1.weight": ("embeddings.patch_embedding.weight",),
        "visual.class_embedding": ("embeddings.class_embedding",),
        "visual.positional_embedding": ("embeddings.position_embedding.weight",),
    }
    for suffix in ("weight", "bias"):
        out[f"visual.ln_pre.{suffix}"] = (f"pre_layrnorm.{suffix}",)
        out[f"visual.ln_post.{suffix}"] = (f"post_layernorm.{suffix}",)
        for i in range(layers):
            src, dst = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
            for old, new in _BLOCK.items():
                out[f"{src}{old}.{suffix}"] = (f"{dst}{new}.{suffix}",)
            out[f"{src}attn.in_proj_{suffix}"] = tuple(f"{dst}self_attn.{p}_proj.{suffix}" for p in "qkv")
    return out


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in OPEN_CLIP_WEIGHTS:
        path = directory / name
        if path.is_file():
            state = load_file(str(path)) if name.endswith(".safetensors") else load_pickle(path)
            if any(k.startswith("visual.") for k in state):
                return state
            raise CheckpointError(f"{str(path)!r} has no visual.* tensors: it is not an open_clip CLIP state dict")
    raise CheckpointError(
        f"{str(directory)!r} has {OPEN_CLIP_CONFIG} but no weights: expected one of {list(OPEN_CLIP_WEIGHTS)}"
    )


def _map(state: dict[str, torch.Tensor], table: dict[str, tuple[str, ...]], what: str) -> dict[str, torch.Tensor]:
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}  # the rest is the unused text tower
    known = set(table) | {"visual.proj"}
    unknown = sorted(k for k in visual if k not in known)
    if unknown or set(table) - set(visual):
        check_keys({k: v for k, v in visual.items() if k in table},
                   {k: visual[k].shape if k in visual else torch.Size() for k in table}, what=what, unmapped=unknown)
    mapped: dict[str, torch.Tensor] = {}
    for src, targets in table.items():
        mapped.update(zip(targets, visual[src].chunk(len(targets), dim=0)))
    return mapped


def load_open_clip_vision(
    path: str | Path, *, patch_ln_post: bool = False, dtype: torch.dtype | None = None
) -> tuple[VisionConfig, Any]:
    """Read an open_clip ViT directory into interleaf's CLIP tower, features as OpenFlamingo takes them.

    The features are the last block's patch tokens, class token dropped; ``patch_ln_post`` says
    whether they pass through the final ``ln_post`` LayerNorm, which depends on the open_clip
    version that ran the model (see :func:`interleaf.convert.from_openflamingo`). Returns the
    :class:`~interleaf.config.VisionConfig` (normalisation from ``preprocess_cfg``) and the loaded
    :class:`~interleaf.model.vision.VisionTower`.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..model.vision import build_vision_tower

    directory = Path(path).expanduser()
    what = f"open_clip vision tower {str(directory)!r}"
    meta = read_json(directory / OPEN_CLIP_CONFIG, "open_clip model directory", error=CheckpointError)
    model_cfg = meta.get("model_cfg") if isinstance(meta, dict) else None
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{what}: {OPEN_CLIP_CONFIG} has no model_cfg (open_clip's hub layout writes one)")
    hf = CLIPVisionConfig(**open_clip_vision_config(model_cfg, what))
    mapped = _map(_read_weights(directory), open_clip_key_map(hf.num_hidden_layers), what)
    tower = CLIPVisionModel(hf)
    inner = getattr(tower, "vision_model", tower)  # transformers 4 nests the transformer; 5 does not
    check_keys(mapped, {k: v.shape for k, v in inner.state_dict().items()}, what=what + " (mapped onto CLIP)")
    inner.load_state_dict(mapped, strict=True)
    if dtype is not None:
        tower.to(dtype)
    pre = meta.get("preprocess_cfg") or {}
    cfg = VisionConfig(
        kind="clip", hf_config=hf.to_dict(), feature_layer=-1, drop_cls_token=True, post_layernorm=patch_ln_post,
        image_mean=tuple(float(x) for x in pre.get("mean", CLIP_MEAN)),
        image_std=tuple(float(x) for x in pre.get("std", CLIP_STD)),
        resize="shortest_edge_crop",
    )
    return cfg, build_vision_tower(cfg, tower)
