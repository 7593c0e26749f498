"""interleaf: build, train, evaluate and serve Flamingo-lineage vision-language models.

    model, processor = interleaf.build("tiny-random")
    inputs = processor([["A photo:", image, "It shows"]])
    out = model.generate(**inputs, max_new_tokens=20)
    print(processor.batch_decode(out))

Importing interleaf registers its config, model and processor with transformers' ``Auto*``
classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)``
load an interleaf directory without ``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .api import build, load, save
from .config import (
    CrossAttentionConfig,
    InterleafConfig,
    ResamplerConfig,
    TokensConfig,
    VisionConfig,
)
from .errors import CheckpointError, ConfigError, InputError, InterleafError, OfflineError
from .model import InterleafForConditionalGeneration
from .model.lora import lora_targets, merge_lora
from .presets import presets
from .processing import InterleafProcessor

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register("interleaf", InterleafConfig, exist_ok=True)
    AutoModelForCausalLM.register(InterleafConfig, InterleafForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(InterleafConfig, InterleafForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(InterleafConfig, InterleafProcessor, exist_ok=True)


_register()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CrossAttentionConfig",
    "InputError",
    "InterleafConfig",
    "InterleafError",
    "InterleafForConditionalGeneration",
    "InterleafProcessor",
    "OfflineError",
    "ResamplerConfig",
    "TokensConfig",
    "VisionConfig",
    "build",
    "load",
    "lora_targets",
    "merge_lora",
    "presets",
    "save",
]
