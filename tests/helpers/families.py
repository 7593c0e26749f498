"""The model families every verb is tested with: one tiny model per fusion and placement.

- ``cross_attention``: the ``tiny-random`` preset (Flamingo's gated cross-attention);
- ``expand``: the ``tiny-llava`` preset (token insertion, LLaVA's placement: one ``<image>`` per
  vision token, an MLP projector);
- ``replace``: ``tiny-llava`` with xGen-MM's placement (one ``<image>`` per image, which the model
  replaces by the image's embeddings, so the row grows) and a linear projector.

A test parametrised over ``FAMILIES`` builds its model with :func:`build_family` (build options
for a training stage with :func:`stage_model`), so a new family is one entry here.
"""

from __future__ import annotations

from typing import Any

import interleaf

FAMILIES = ("cross_attention", "expand", "replace")

# (preset, build options); the cross-attention gates open so that images change the outputs
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "cross_attention": ("tiny-random", {"cross_attention": {"gate_init": "ones"}}),
    "expand": ("tiny-llava", {}),
    "replace": ("tiny-llava", {"insertion": {"placement": "replace"}, "projector": {"kind": "linear"}}),
}

# each family's freeze policies, the one that trains the connector and the LM first
POLICIES = {
    "cross_attention": ("unfreeze_lm", "flamingo"),
    "expand": ("projector_lm", "projector"),
    "replace": ("projector_lm", "projector"),
}


def build_family(family: str, seed: int = 0, **options: Any):
    """``(model, processor)`` of ``family`` with random weights drawn from ``seed``."""
    preset, own = _SPECS[family]
    return interleaf.build(preset, seed=seed, **{**own, **options})


def stage_model(family: str) -> dict[str, Any]:
    """The ``model:`` section of a training stage that builds ``family``'s tiny model (gates as built)."""
    preset, own = _SPECS[family]
    return {"preset": preset, **{k: v for k, v in own.items() if k != "cross_attention"}}
