"""A stage's ``lora:`` section: low-rank adapters on the parts it names, instead of training them in full.

::

    freeze: flamingo            # what trains in full: here the resampler, the cross-attention blocks
                                # and the added token rows (token insertion: projector, the projector)
    lora:
      rank: 8                   # r, >= 1
      alpha: 16                 # the adapters' output is scaled by alpha / rank
      dropout: 0.05             # on the adapters' input, in [0, 1)
      parts: [lm_attention, lm_mlp]   # any of lm_attention, lm_mlp, cross_attention, resampler
                                      # (or projector: the same part), vision
      quantize: null            # 4bit: QLoRA's 4-bit base weights (bitsandbytes, CUDA)

The adapters go on exactly the linear layers of the named parts
(:func:`interleaf.model.lora.lora_targets`: full module paths, so the LM's ``q_proj`` never also
matches the vision tower, the resampler or a cross-attention block). The freeze policy keeps its
say over everything else: the parts it trains in full keep training in full, except an adapted
layer's own weights, and, when the LM or the vision tower is adapted, the rest of that part (its
embeddings and norms). Checkpoints hold the adapters with the other trainable weights;
``OUT/final`` holds the base model and the adapters (see :mod:`interleaf.model.lora`), which
``interleaf merge-lora OUT/final MERGED`` folds together. A stage that starts from a directory with
adapters (``model: {path: ...}`` or ``from_stage``) starts from that model with the adapters merged.

``quantize: 4bit`` asks for QLoRA's 4-bit base weights. It needs CUDA and the bitsandbytes package
(not a dependency of interleaf), and interleaf's trainer does not quantize a base model yet: the
stage stops at set-up with a :class:`~interleaf.errors.ConfigError` that says which of these is
missing, before anything is trained.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..model.lora import LORA_PARTS, add_lora, require_peft
from ..schema import join, setting

QUANTIZE = ("4bit",)


@dataclass
class LoRAConfig:
    """The ``lora:`` section of a stage (see the module docstring)."""

    rank: int = setting(8, ge=1)
    alpha: float = setting(16.0, gt=0)
    dropout: float = setting(0.0, ge=0)
    parts: list[Literal[LORA_PARTS]] = setting(factory=lambda: ["lm_attention", "lm_mlp"], nonempty=True)
    quantize: Literal[QUANTIZE] | None = None

    def _check(self, path: str) -> None:
        if self.dropout >= 1:
            raise ConfigError(join(path, "dropout"), f"must be below 1, got {self.dropout}", "e.g. 0.05, or 0 for none")
        if len(set(self.parts)) != len(self.parts):
            raise ConfigError(join(path, "parts"), f"names a part twice: {list(self.parts)}", "list each part once")


def check_quantize(cfg: LoRAConfig, device: torch.device) -> None:
    """Refuse ``quantize`` with the reason: no CUDA device, no bitsandbytes, or no 4-bit base in this trainer."""
    if cfg.quantize is None:
        return
    where = "lora.quantize"
    if device.type != "cuda":
        raise ConfigError(
            where, f"{cfg.quantize!r} needs a CUDA GPU (bitsandbytes' 4-bit kernels), and this stage runs on {device.type}",
            "remove lora.quantize to train LoRA adapters on full-precision base weights (bf16 precision halves them)",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            where, f"{cfg.quantize!r} needs the bitsandbytes package, which is not installed (interleaf does not "
            "depend on it)", "pip install bitsandbytes on the CUDA machine, or remove lora.quantize",
        )
    raise ConfigError(
        where, f"{cfg.quantize!r}: interleaf's trainer does not build 4-bit base weights yet",
        "remove lora.quantize and train the adapters on bf16 base weights (precision: bf16)",
    )


def apply_lora(model: nn.Module, cfg: LoRAConfig, device: torch.device) -> list[str]:
    """Attach the stage's adapters to ``model`` (after its freeze policy); returns the adapted layers."""
    require_peft("lora")
    check_quantize(cfg, device)
    return add_lora(model, cfg.parts, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)


__all__ = ["LoRAConfig", "QUANTIZE", "apply_lora", "check_quantize"]
