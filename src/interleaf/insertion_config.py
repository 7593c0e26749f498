"""The token-insertion family's config sections: the projector (with xGen-MM's token sampler), where
the image embeddings go (placement), and any-resolution tiling. :mod:`interleaf.config` holds them in
an :class:`~interleaf.config.InterleafConfig` (and re-exports them); each is read and checked by
:mod:`interleaf.schema` like every other section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError
from .schema import setting, validate


@dataclass
class TokenSamplerConfig:
    """xGen-MM's perceiver "token sampler": each group of V vision features -> ``num_latents`` LM tokens.

    A projector of the token-insertion fusion (see :mod:`interleaf.model.token_sampler`). The
    defaults are xGen-MM r-v1.5's (SigLIP so400m 1152 -> Phi-3-mini 3072: 109,901,568 parameters).
    Names against the released code: ``head_dim`` is its ``dim_head``, ``out_dim`` its ``dim_inner``.
    """

    dim: int | None = setting(None, ge=1)  # input feature width; None: given by the model (the vision tower's)
    out_dim: int | None = setting(None, ge=1)  # width of the tokens made; None: given by the model (the LM's)
    depth: int = setting(6, ge=1)  # perceiver layers (attention + feed-forward)
    num_latents: int = setting(128, ge=1)  # tokens per group
    heads: int = setting(16, ge=1)
    head_dim: int = setting(96, ge=1)
    ff_mult: int = setting(4, ge=1)  # feed-forward width = ff_mult * dim
    norm_eps: float = setting(1e-5, gt=0)  # every LayerNorm's epsilon (PyTorch's default, as released)

    def __post_init__(self):
        validate(self, "token_sampler")


@dataclass
class ProjectorConfig:
    """Token insertion: vision features ``(K, V, Dv)`` -> embeddings at the LM's width ``(K, V', D)``.

    ``mlp2x_gelu``: LLaVA's ``linear -> activation -> linear`` (``Dv -> D -> D``); ``linear``: one
    ``Dv -> D`` map; ``token_sampler``: xGen-MM's perceiver (latents attend to the media and to
    themselves, a final norm, a linear map to ``D``), configured by its own section.
    """

    kind: Literal["mlp2x_gelu", "linear", "token_sampler"] = "mlp2x_gelu"
    bias: bool = True  # LLaVA's multimodal_projector_bias
    activation: str = setting("gelu", nonempty=True)  # mlp2x_gelu's activation (transformers' ACT2FN name)
    # kind "token_sampler": its settings (None: xGen-MM r-v1.5's); its widths default to the model's
    token_sampler: TokenSamplerConfig | None = None

    def __post_init__(self):
        validate(self, "projector")

    def _check(self, path: str) -> None:
        if self.token_sampler is not None and self.kind != "token_sampler":
            raise ConfigError(f"{path}.token_sampler", f"is set but the projector is {self.kind!r}",
                              "remove it, or set kind: token_sampler")


ANYRES_CONVENTIONS = ("xgenmm", "llava_next")
# The grids both released families were trained with, as multiples of the base size, in each convention's own
# order: xGen-MM reads them as (width, height), LLaVA-NeXT's image_grid_pinpoints as (height, width).
ANYRES_GRID_MULTIPLES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass
class AnyresConfig:
    """Any-resolution tiling: each image becomes a base view plus a grid of crops (:mod:`interleaf.processing.anyres`).

    ``grids`` are the candidate canvases in pixels, each side a multiple of ``base_size``, written in the
    convention's own order: ``"xgenmm"`` (width, height) as xGen-MM's ``anyres_grids``, ``"llava_next"``
    (height, width) as LLaVA-NeXT's ``image_grid_pinpoints``. The defaults are xGen-MM r-v1.5's.
    """

    convention: Literal["xgenmm", "llava_next"] = "xgenmm"
    base_size: int = setting(384, ge=1)  # side of the base view and of every crop, in px (the tower's input size)
    patch_size: int = setting(14, ge=1)  # the tower's patch side: a view gives (base_size // patch_size) ** 2 tokens
    grids: list[tuple[int, int]] | None = setting(None, ge=1, nonempty=True)  # None: ANYRES_GRID_MULTIPLES x base
    max_crops: int = setting(4, ge=1)  # the most crops a grid may have (4: both released families' 2x2)
    max_image_pixels: int = setting(50_000_000, ge=1)  # larger images are refused before any resizing

    def __post_init__(self):
        validate(self, "anyres")

    def _check(self, path: str) -> None:
        s = self.base_size
        if self.patch_size > s:
            raise ConfigError(f"{path}.patch_size", f"{self.patch_size} is larger than base_size {s}")
        if self.grids is None:
            self.grids = [(a * s, b * s) for a, b in ANYRES_GRID_MULTIPLES]
        order = "(width, height)" if self.convention == "xgenmm" else "(height, width)"
        for i, (a, b) in enumerate(self.grids):
            if a % s or b % s:
                raise ConfigError(f"{path}.grids[{i}]", f"{[a, b]} is not a multiple of base_size {s} on each side",
                                  f"write each grid as {order} in px, e.g. {[s, 2 * s]}")
            if (a // s) * (b // s) > self.max_crops:
                raise ConfigError(f"{path}.grids[{i}]",
                                  f"{[a, b]} has {(a // s) * (b // s)} crops, above max_crops {self.max_crops}",
                                  "drop that grid or raise max_crops")


@dataclass
class InsertionConfig:
    """Token insertion: where the projected image embeddings go in the LM's input.

    ``expand`` (LLaVA): the processor writes one ``<image>`` token per vision token and the model
    writes the embeddings over them, so the sequence keeps its length. ``replace`` (xGen-MM): the
    text holds one ``<image>`` token per image; the model replaces it by the image's whole
    embedding sequence, and the row grows (:func:`interleaf.model.token_insertion.expand_image_tokens`).
    """

    placement: Literal["expand", "replace"] = "expand"
    # Any-resolution tiling (LLaVA-NeXT, xGen-MM): each image becomes a base view plus crops, and
    # takes as many embeddings as :func:`interleaf.processing.anyres.num_image_tokens` says. None: one view.
    anyres: AnyresConfig | None = None

    def __post_init__(self):
        validate(self, "insertion")
