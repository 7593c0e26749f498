"""Training: stage and recipe configs, the loop, optimiser and schedules, checkpoints, DDP / FSDP2.

    from interleaf.training import train
    results = train("sft_llava", ["max_steps=100"], model="runs/demo/final",
                    data="my.json", images="my_images/")
"""

from .config import (
    CheckpointConfig,
    DPOConfig,
    DistributedConfig,
    ModelSpec,
    OptimConfig,
    Recipe,
    StageConfig,
    apply_overrides,
    llava_mixture,
    load_recipe,
    parse_override,
    parse_stage,
)
from ..model.loss import weighted_token_loss
from .loop import StageResult, train, train_stage
from .optim import build_optimizer, lr_factor, param_groups

__all__ = [
    "CheckpointConfig",
    "DPOConfig",
    "DistributedConfig",
    "ModelSpec",
    "OptimConfig",
    "Recipe",
    "StageConfig",
    "StageResult",
    "apply_overrides",
    "build_optimizer",
    "llava_mixture",
    "load_recipe",
    "lr_factor",
    "param_groups",
    "parse_override",
    "parse_stage",
    "train",
    "train_stage",
    "weighted_token_loss",
]
