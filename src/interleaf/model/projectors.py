"""Projectors of the token-insertion family: vision features -> embeddings at the LM's width.

Every projector maps ``(K, V, Dv)`` (K images, V vision tokens each) to ``(K, V', D)``:

- :class:`MLPProjector` (``mlp2x_gelu``, LLaVA's ``multi_modal_projector``):
  ``linear_1 (Dv -> D) -> activation -> linear_2 (D -> D)``, with bias; V' = V.
- :class:`LinearProjector` (``linear``): one ``Dv -> D`` map; V' = V.
- :class:`~interleaf.model.token_sampler.TokenSampler` (``token_sampler``, xGen-MM's perceiver):
  V' = its ``num_latents``, whatever V is.

:func:`build_projector` is the one place a projector is chosen.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..config import ProjectorConfig, TokenSamplerConfig
from ..errors import ConfigError
from .token_sampler import TokenSampler

__all__ = ["LinearProjector", "MLPProjector", "build_projector"]


class MLPProjector(nn.Module):
    """LLaVA's two-layer MLP; parameter names ``linear_1`` / ``linear_2`` as transformers' Llava."""

    def __init__(self, in_dim: int, out_dim: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in ACT2FN:
            raise ConfigError("projector.activation", f"unknown activation {activation!r}", "use e.g. 'gelu'")
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LinearProjector(nn.Module):
    """One linear map from the vision width to the LM's."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The projector of ``cfg`` from vision width ``in_dim`` to LM width ``out_dim``.

    A projector has ``forward(features (K, V, Dv)) -> (K, V', D)``; one that resamples to a fixed
    number of tokens says how many in ``num_latents`` (the others keep the vision tower's V).
    """
    if cfg.kind == "mlp2x_gelu":
        return MLPProjector(in_dim, out_dim, cfg.activation, cfg.bias)
    if cfg.kind == "linear":
        return LinearProjector(in_dim, out_dim, cfg.bias)
    return TokenSampler(cfg.token_sampler or TokenSamplerConfig(), in_dim, out_dim)
