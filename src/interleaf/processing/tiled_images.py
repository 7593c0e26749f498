"""The processor's any-resolution inputs: loaded images and their stacked views.

LLaVA-NeXT and xGen-MM both tile an image into a base view and crops (:mod:`.anyres`); the processor
returns every image's views as one ``(K, max_views, 3, S, S)`` tensor, zero-padded on the view axis, with
``image_sizes`` ``(K, 2)`` in the model's own order: (height, width) for LLaVA-NeXT, (width, height) for
xGen-MM. xGen-MM writes one ``<image>`` token per image, which its model replaces by ``(1 + N crops) *
tokens.image_lm_length`` positions (:meth:`~interleaf.processing.prompt_format.PromptFormat.lm_token_count`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ..config import AnyresConfig
from . import anyres as anyres_tiling


@dataclasses.dataclass
class LoadedImage:
    """A loaded image and the name errors give it; ``size`` is (width, height)."""

    image: Any
    where: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def tiled_pixels(
    images: Sequence[LoadedImage], cfg: AnyresConfig, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' views -> ``pixel_values`` (K, max_views, 3, S, S), zero-padded on the view axis, and
    ``image_sizes`` (K, 2): (width, height) under the ``xgenmm`` convention, (height, width) under
    ``llava_next``."""
    views, sizes = [], []
    for loaded in images:
        pixels, _ = anyres_tiling.pixel_values(loaded.image, cfg, mean, std, where=loaded.where)
        views.append(pixels)  # (1+N, 3, S, S)
        sizes.append(anyres_tiling.model_size(cfg, loaded.size))
    out = pad_sequence(views, batch_first=True).to(torch.float32)  # (K, max_views, 3, S, S)
    return out, torch.tensor(sizes, dtype=torch.long)


__all__ = ["LoadedImage", "tiled_pixels"]
