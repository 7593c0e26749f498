"""Turning images, text and chat conversations into model inputs.

- :func:`load_image` / :class:`ImageTransform`: any image a user passes -> a normalised tensor.
- :func:`build_tiny_tokenizer`: an offline byte-level BPE for tiny models and the demo;
  :func:`load_tokenizer`: a saved tokenizer from a local directory.
- :class:`PromptFormat`: how each model family writes images and turns, image spans, truncation
  (shared by the processor and the training tokeniser).
- :class:`InterleafProcessor`: interleaved prompts and chat messages -> ``input_ids``,
  ``attention_mask``, ``pixel_values`` and ``image_attention_mask``; also a transformers
  ``ProcessorMixin`` (``text=``, ``images=``, ``apply_chat_template``) for TRL.
- :class:`ImagePlaceholderMasking`: a collator wrapper whose labels skip the image placeholders.
"""

from .hf_processor import ImagePlaceholderMasking
from .images import ImageTransform, load_image, to_rgb
from .processor import InterleafProcessor
from .prompt_format import IGNORE_INDEX, PromptFormat
from .tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX", "ImagePlaceholderMasking", "ImageTransform", "InterleafProcessor", "PromptFormat", "build_tiny_tokenizer", "load_image",
    "load_tokenizer", "to_rgb",
]
