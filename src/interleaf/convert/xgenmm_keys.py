"""Key tables between the released xGen-MM (BLIP-3) checkpoints and interleaf's modules.

The released checkpoints hold the perceiver token sampler under ``vlm.vision_tokenizer.``
(``XGenMMModelForConditionalGeneration.vlm.vision_tokenizer``)::

    released (under vlm.vision_tokenizer.)      interleaf TokenSampler
    latents                                     latents
    layers.{i}.0.norm_media.{weight,bias}       layers.{i}.attn.norm_media.{weight,bias}
    layers.{i}.0.norm_latents.{weight,bias}     layers.{i}.attn.norm_latents.{weight,bias}
    layers.{i}.0.to_q.weight                    layers.{i}.attn.q_proj.weight
    layers.{i}.0.to_kv.weight                   layers.{i}.attn.kv_proj.weight   (keys first, then values)
    layers.{i}.0.to_out.weight                  layers.{i}.attn.out_proj.weight
    layers.{i}.1.0.{weight,bias}                layers.{i}.ff.norm.{weight,bias}
    layers.{i}.1.1.weight                       layers.{i}.ff.fc1.weight
    layers.{i}.1.3.weight                       layers.{i}.ff.fc2.weight
    norm.{weight,bias}                          norm.{weight,bias}
    projection.{weight,bias}                    proj.{weight,bias}

Every entry is a rename (no tensor is split or merged), so converting there and back is
bit-identical. :func:`sampler_state_from_xgenmm` and :func:`sampler_state_to_xgenmm` apply the
table strictly: an unknown, missing, unexpected or mis-shaped key is one
:class:`~interleaf.errors.CheckpointError` listing them.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ._common import _listing, check_keys, expected_shapes

__all__ = [
    "XGENMM_SAMPLER_PREFIX",
    "interleaf_to_xgenmm_sampler_key_map",
    "sampler_state_from_xgenmm",
    "sampler_state_to_xgenmm",
    "xgenmm_sampler_key_map",
]

XGENMM_SAMPLER_PREFIX = "vlm.vision_tokenizer."

_LAYER_NORMS = {"0.norm_media": "attn.norm_media", "0.norm_latents": "attn.norm_latents", "1.0": "ff.norm"}
_LAYER_LINEARS = {
    "0.to_q": "attn.q_proj",
    "0.to_kv": "attn.kv_proj",
    "0.to_out": "attn.out_proj",
    "1.1": "ff.fc1",
    "1.3": "ff.fc2",
}


def xgenmm_sampler_key_map(depth: int, prefix: str = XGENMM_SAMPLER_PREFIX) -> dict[str, str]:
    """Released token-sampler keys (with ``prefix``) -> :class:`~interleaf.model.token_sampler.TokenSampler` keys."""
    mapping = {f"{prefix}latents": "latents"}
    for suffix in ("weight", "bias"):
        mapping[f"{prefix}norm.{suffix}"] = f"norm.{suffix}"
        mapping[f"{prefix}projection.{suffix}"] = f"proj.{suffix}"
    for i in range(depth):
        for old, new in _LAYER_NORMS.items():
            for suffix in ("weight", "bias"):
                mapping[f"{prefix}layers.{i}.{old}.{suffix}"] = f"layers.{i}.{new}.{suffix}"
        for old, new in _LAYER_LINEARS.items():
            mapping[f"{prefix}layers.{i}.{old}.weight"] = f"layers.{i}.{new}.weight"
    return mapping


def interleaf_to_xgenmm_sampler_key_map(depth: int, prefix: str = XGENMM_SAMPLER_PREFIX) -> dict[str, str]:
    """The inverse table: :class:`TokenSampler` keys -> released keys (with ``prefix``)."""
    return {ours: theirs for theirs, ours in xgenmm_sampler_key_map(depth, prefix).items()}


def sampler_state_from_xgenmm(
    state: Mapping[str, torch.Tensor],
    sampler: nn.Module,
    *,
    prefix: str = XGENMM_SAMPLER_PREFIX,
    what: str = "xGen-MM token sampler",
) -> dict[str, torch.Tensor]:
    """The state dict of ``sampler`` (a ``TokenSampler``) from a released checkpoint's tensors.

    Keys outside ``prefix`` (the vision tower, the LM) are left alone; every key under it must be
    in the table, and the mapped keys and shapes must be exactly the sampler's.
    """
    table = xgenmm_sampler_key_map(sampler.cfg.depth, prefix)
    ours = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not ours:
        raise CheckpointError(
            f"{what}: the checkpoint holds no key under {prefix!r}; is it an xGen-MM checkpoint "
            f"(keys vlm.vision_encoder.*, vlm.vision_tokenizer.*, vlm.lang_model.*)?"
        )
    unmapped = sorted(k for k in ours if k not in table)
    mapped = {table[k]: v for k, v in ours.items() if k in table}
    check_keys(mapped, expected_shapes(sampler), what=what, unmapped=unmapped)
    return mapped


def sampler_state_to_xgenmm(
    state: Mapping[str, torch.Tensor], depth: int, *, prefix: str = XGENMM_SAMPLER_PREFIX
) -> dict[str, torch.Tensor]:
    """A :class:`TokenSampler` state dict under the released names (with ``prefix``), strictly."""
    table = interleaf_to_xgenmm_sampler_key_map(depth, prefix)
    unknown = sorted(set(state) - set(table))
    missing = sorted(set(table) - set(state))
    if unknown or missing:
        parts = [_listing("keys the xGen-MM layout has no name for", unknown)] if unknown else []
        parts += [_listing("missing keys", missing)] if missing else []
        raise CheckpointError(
            f"token sampler state dict for depth {depth}: " + "; ".join(parts)
            + " (pass the state_dict() of a TokenSampler built with this depth)"
        )
    return {table[k]: v for k, v in state.items()}
