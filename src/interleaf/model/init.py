"""The one initialisation of linear layers and LayerNorms for modules trained from scratch."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_linears_and_norms(module: nn.Module, std: float = 0.02) -> None:
    """Every ``nn.Linear`` of ``module``: truncated normal weights (``std``), zero biases; every
    ``nn.LayerNorm``: unit weights, zero biases (in ``module.modules()`` order, so runs are reproducible)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
