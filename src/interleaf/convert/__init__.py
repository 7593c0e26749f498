"""Checkpoint converters between interleaf and the seeds' own formats.

- :func:`from_idefics` / :func:`to_idefics`: transformers ``IdeficsForVisionText2Text``
  directories, both ways, with exact logits parity.
- :func:`from_llava` / :func:`to_llava`: transformers ``LlavaForConditionalGeneration``
  directories (either hub key layout), both ways, with exact logits parity.
- :func:`from_llava_next` / :func:`to_llava_next`: transformers ``LlavaNextForConditionalGeneration``
  directories (either hub key layout, ``image_newline`` included), both ways, with logits parity.
- :func:`from_xgenmm`: the released xGen-MM (BLIP-3) layout (``vlm.vision_encoder.*``,
  ``vlm.vision_tokenizer.*``, ``vlm.lang_model.*``, safetensors only), base or instruct.
- :func:`from_infimm`: InfiMM checkpoints (``config.json`` + ``pytorch_model.bin`` or safetensors, any of
  the key paths InfiMM's code registers), EVA-CLIP tower included.
- :func:`from_openflamingo`: OpenFlamingo's ``checkpoint.pt`` (trainable weights only) plus its
  base LM and CLIP vision tower as local transformers directories.

Each converter maps every weight through an explicit key table; a missing or unexpected key is
an error that lists them. Foreign pickles are read with ``torch.load(weights_only=True)`` only.
"""

from .idefics import from_idefics, idefics_to_interleaf_config, interleaf_to_idefics_config, to_idefics
from .infimm import from_infimm
from .llava import from_llava, to_llava
from .llava_next import from_llava_next, to_llava_next
from .openflamingo import from_openflamingo, openflamingo_key_map
from .xgenmm import from_xgenmm

__all__ = [
    "from_idefics",
    "from_infimm",
    "from_llava",
    "from_llava_next",
    "from_openflamingo",
    "from_xgenmm",
    "idefics_to_interleaf_config",
    "interleaf_to_idefics_config",
    "openflamingo_key_map",
    "to_idefics",
    "to_llava",
    "to_llava_next",
]
