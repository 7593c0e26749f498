"""AdamW over the trainable parameters only, with decay and no-decay groups, and LR schedules.

Weight decay applies to weight matrices (and convolution kernels) only. Not decayed:

- every 1-D parameter: norm scales and biases, vector gates;
- the tanh gates (``attn_gate`` / ``ffn_gate``, also when scalar-shaped): decay would pull the
  learned image contribution back towards "off";
- embedding tables, including the added tokens' rows (``DecoupledEmbedding.extra``), position
  tables and the resampler's learned latent queries: a row is updated only when its token appears, so decay
  would shrink rare tokens' rows towards zero every step for nothing. The added output rows of
  the LM head (``DecoupledHead.extra``) are a weight matrix and are decayed, like the head.

Frozen parameters never reach the optimiser, so they hold no state (no Adam moments).

Schedules (``step`` counts optimiser steps from 0; ``lr(step)`` is used for that step):
warmup ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, then with
``p = (step - warmup) / max(1, total - warmup)`` in [0, 1] and ``floor = min_lr_ratio``:
constant 1; linear ``1 - (1 - floor) * p``; cosine ``floor + (1 - floor) * (1 + cos(pi p)) / 2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

GATE_NAMES = ("attn_gate", "ffn_gate")
_TABLES = ("latents", "pos_embed", "cls_token")  # learned queries and position tables: rows, not maps


def _is_no_decay(name: str, param: nn.Parameter, embedding_ids: set[int]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf in GATE_NAMES or leaf in _TABLES or id(param) in embedding_ids


def _embedding_ids(model: nn.Module) -> set[int]:
    from ..model.embeddings import DecoupledEmbedding

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
        elif isinstance(module, DecoupledEmbedding):
            ids |= {id(module.weight), id(module.extra)}
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` and ``no_decay`` (each has ``names``)."""
    embedding_ids = _embedding_ids(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if _is_no_decay(name, p, embedding_ids) else decay).append((name, p))
    groups = [
        {"group": "decay", "params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"group": "no_decay", "params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (see the module docstring for the groups)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        from ..errors import ConfigError

        raise ConfigError("freeze", "leaves no trainable parameter", "choose a freeze policy that trains something")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning-rate multiplier for optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["build_optimizer", "lr_factor", "param_groups", "set_lr"]
