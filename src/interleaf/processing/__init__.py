"""Turning images, text and chat conversations into model inputs.

- :func:`load_image` / :class:`ImageTransform`: any image a user passes -> a normalised tensor.
- :func:`build_tiny_tokenizer`: an offline byte-level BPE for tiny models and the demo.
- :class:`InterleafProcessor`: interleaved prompts and chat messages -> ``input_ids``,
  ``attention_mask``, ``pixel_values`` and ``image_attention_mask``.
"""

from .images import ImageTransform, load_image, to_rgb
from .processor import InterleafProcessor
from .tokenizer import build_tiny_tokenizer

__all__ = ["ImageTransform", "InterleafProcessor", "build_tiny_tokenizer", "load_image", "to_rgb"]
