"""Any-resolution ("anyres") tiling: an image becomes a base view and a grid of crops, and their vision
tokens are laid out as xGen-MM (BLIP-3) or LLaVA-NeXT expect. Pure functions, PIL and torch only.

```
image (W, H) ── plan() ─► canvas (W', H') = grid (cols x rows) x base, chosen by select_best_resolution
  │
  ├─ squash to base x base ──────────────────────────────► view 0 (the base view, always first)
  └─ resize_and_pad to the canvas (centred, black) ─► crops, rows outer, columns inner ─► views 1..N
views ─► per-view transform (/255, normalise) ─► pixel_values (1+N, 3, base, base)

vision tower ─► features (1+N, t*t, C), t = base // patch
crops' features stitched ─► map (C, rows*t, cols*t); the padding's tokens are found by unpad_bounds()
  xgenmm:     map kept whole with a key-padding mask; regrouped RAW into N groups of t*t tokens (group g holds
              map tokens [g*t*t, (g+1)*t*t) in row-major map order, not crop g); groups = [base, g_0..g_N-1],
              each resampled to num_latents tokens   ─► (1+N) * num_latents tokens per image
  llava_next: map cut to the kept rows/cols, an image_newline column appended, flattened row-major;
              sequence = [base (t*t), map]           ─► t*t + kept_rows * (kept_cols + 1) tokens per image
```

Conventions, and where they differ:

- Sizes here are (width, height), as PIL's ``Image.size``. xGen-MM writes its grids (W, H); LLaVA-NeXT writes its
  ``image_grid_pinpoints`` and ``image_sizes`` (H, W): :class:`~interleaf.config.AnyresConfig` keeps each
  family's grids in its own order and :func:`candidates` turns them into (W, H); a row (h, w) of LLaVA-NeXT's
  ``image_sizes`` is planned as ``plan((w, h), cfg)``. With the default grids the two orders break ties
  differently (xGen-MM tries the tall 1x2 first, LLaVA-NeXT the wide one).
- Unpadding: xGen-MM truncates (``int(H * (cols / W))``); LLaVA-NeXT rounds to 7 decimals first
  (``int(round(H * (cols / W), 7))``). Both pad symmetrically, ``(rows - new_rows) // 2`` each side.
- The per-view transform is the same arithmetic in both (torchvision's ``ToTensor`` / ``Normalize`` and
  transformers' float64 rescale give the same float32 on every 8-bit value); only mean and std differ.

Provenance: :func:`map_sources`, :func:`xgenmm_groups` and :func:`llava_next_sources` say, for each position of
what the model sees, which view and which token (row-major within the view) it holds; the feature functions
gather by these indices, so the layout is written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import AnyresConfig
from ..errors import ConfigError, InputError

Size = tuple[int, int]  # (width, height) in px
NEWLINE = -1  # the view index llava_next_sources() gives an image_newline position


@dataclass(frozen=True)
class TilePlan:
    """How one image is tiled. Sizes are (width, height) in px; ``grid`` is (cols, rows) of crops."""

    convention: str
    image_size: Size
    canvas: Size
    grid: tuple[int, int]
    base_size: int
    tokens_per_side: int  # t: a view gives t x t tokens

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        """The base view and the crops."""
        return 1 + self.num_crops

    @property
    def map_shape(self) -> tuple[int, int]:
        """(rows, cols) of the stitched crop feature map, in tokens."""
        return self.grid[1] * self.tokens_per_side, self.grid[0] * self.tokens_per_side

    @property
    def content_size(self) -> Size:
        """The image's size once resized onto the canvas (before the black padding)."""
        return fit_size(self.image_size, self.canvas)


def candidates(cfg: AnyresConfig) -> list[Size]:
    """The config's grids as (width, height) canvases, in the config's order (the order breaks ties)."""
    if cfg.convention == "xgenmm":
        return [(a, b) for a, b in cfg.grids]
    return [(b, a) for a, b in cfg.grids]  # LLaVA-NeXT's pinpoints are (height, width)


def select_best_resolution(image_size: Size, canvases: Sequence[Size]) -> Size:
    """The canvas that keeps the most of the image's resolution, then wastes the least (both conventions' rule).

    For each (W', H'): ``s = min(W'/W, H'/H)``, effective = ``min(int(W*s) * int(H*s), W*H)``, wasted =
    ``W'*H' - effective``. The largest effective wins, ties go to the smaller waste, and strict comparisons
    keep the first listed on a full tie (also when every canvas keeps nothing of a very thin image).
    """
    width, height = image_size
    best, best_effective, best_wasted = None, 0, math.inf
    for cw, ch in canvases:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cw, ch), effective, wasted
    return best


def fit_size(image_size: Size, canvas: Size) -> Size:
    """The size ``resize_and_pad`` gives the image: the tighter side fills the canvas, the other is rounded up."""
    width, height = image_size
    cw, ch = canvas
    scale_w, scale_h = cw / width, ch / height
    if scale_w < scale_h:
        return cw, min(math.ceil(height * scale_w), ch)
    return min(math.ceil(width * scale_h), cw), ch


def check_image_size(image_size: Sequence[int], cfg: AnyresConfig, where: str = "image") -> Size:
    """``image_size`` as a (width, height) pair of positive ints within ``cfg.max_image_pixels``, or an InputError."""
    if isinstance(image_size, (torch.Tensor, np.ndarray)):
        image_size = image_size.tolist()
    items = list(image_size) if isinstance(image_size, (list, tuple)) else [image_size]
    if len(items) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise InputError(f"{where}: image size {items!r} is not a (width, height) pair of integers")
    size = (int(items[0]), int(items[1]))
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{where}: image size (width, height) = {size} is empty; pass an image with at least "
                         "one pixel on each side")
    if width * height > cfg.max_image_pixels:
        raise InputError(f"{where}: image of {width} x {height} px is larger than the anyres limit of "
                         f"{cfg.max_image_pixels:,} pixels; resize it, or raise anyres.max_image_pixels")
    return size


def plan(image_size: Sequence[int], cfg: AnyresConfig, where: str = "image") -> TilePlan:
    """How the image of ``image_size`` (width, height) is tiled under ``cfg``.

    Refuses (InputError naming ``where``) an empty image, one above ``cfg.max_image_pixels``, and one too thin
    for the grids: whose content, on the chosen canvas, spans less than one vision token across or down
    (the unpadded feature map would hold nothing of it; crop or pad the image towards a squarer shape).
    The references accept such an image and keep an empty, or all-padding, crop map for it.
    """
    size = check_image_size(image_size, cfg, where)
    canvas = select_best_resolution(size, candidates(cfg))
    s = cfg.base_size
    grid = (canvas[0] // s, canvas[1] // s)
    if grid[0] * grid[1] > cfg.max_crops:  # AnyresConfig refuses such grids; a config edited after checking may not
        raise ConfigError("anyres.grids", f"{where} picks {list(canvas)}, which has {grid[0] * grid[1]} crops, above max_crops "
                          f"{cfg.max_crops}", "drop that grid or raise max_crops")
    tiles = TilePlan(cfg.convention, size, canvas, grid, s, s // cfg.patch_size)
    rows, cols = tiles.map_shape
    if _content_tokens(tiles) < 1:
        raise InputError(
            f"{where}: image of {size[0]} x {size[1]} px is too thin for the anyres grids: on its "
            f"{canvas[0]} x {canvas[1]} canvas it spans less than one of the {rows} x {cols} vision tokens; "
            "crop it (or pad it) towards a squarer shape"
        )
    return tiles


def _content_tokens(tiles: TilePlan) -> int:
    """How many token rows (or columns) the image's content spans on the feature map, along its short side."""
    width, height = tiles.image_size
    rows, cols = tiles.map_shape
    if width / height > cols / rows:
        span = height * (cols / width)
    else:
        span = width * (rows / height)
    return int(span) if tiles.convention == "xgenmm" else int(round(span, 7))


def unpad_bounds(tiles: TilePlan) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the token rows [top, bottom) and columns [left, right) of the stitched map
    that hold the image rather than the canvas's padding, by the convention's own rule (see the module doc)."""
    width, height = tiles.image_size
    rows, cols = tiles.map_shape
    if width / height > cols / rows:
        pad = (rows - _content_tokens(tiles)) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - _content_tokens(tiles)) // 2
    return 0, rows, pad, cols - pad


def unpad_mask(tiles: TilePlan) -> torch.Tensor:
    """``(rows*t, cols*t)`` bool over the stitched crop map: True where the image is, False on padding."""
    rows, cols = tiles.map_shape
    top, bottom, left, right = unpad_bounds(tiles)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def resize_and_pad(image: Image.Image, canvas: Size) -> Image.Image:
    """The image resized (bicubic) to :func:`fit_size` and centred on a black ``canvas`` (width, height)."""
    content = fit_size(image.size, canvas)
    resized = image.resize(content, Image.Resampling.BICUBIC)
    out = Image.new("RGB", canvas, (0, 0, 0))
    out.paste(resized, ((canvas[0] - content[0]) // 2, (canvas[1] - content[1]) // 2))
    return out


def tile_views(image: Image.Image, tiles: TilePlan) -> list[Image.Image]:
    """The views of ``image``: the whole image squashed to base x base, then the canvas's crops row-major."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size != tiles.image_size:
        raise InputError(f"image of size {image.size} does not match its plan's size {tiles.image_size}")
    s = tiles.base_size
    views = [image.resize((s, s), Image.Resampling.BICUBIC)]
    canvas = resize_and_pad(image, tiles.canvas)
    for row in range(tiles.grid[1]):
        for col in range(tiles.grid[0]):
            views.append(canvas.crop((col * s, row * s, (col + 1) * s, (row + 1) * s)))
    return views


def view_pixels(view: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One view -> ``(3, S, S)`` float32: ``(x / 255 - mean) / std`` per channel, in float32."""
    arr = torch.from_numpy(np.asarray(view.convert("RGB"), dtype=np.uint8).copy())  # (S, S, 3)
    pixels = arr.permute(2, 0, 1).float().div(255)  # (3, S, S)
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def pixel_values(
    image: Image.Image, cfg: AnyresConfig, mean: Sequence[float], std: Sequence[float], where: str = "image"
) -> tuple[torch.Tensor, TilePlan]:
    """``(1+N, 3, S, S)`` pixels of an RGB image's views (base first) and its plan."""
    tiles = plan(image.size, cfg, where)
    return torch.stack([view_pixels(v, mean, std) for v in tile_views(image, tiles)]), tiles


def model_size(cfg: AnyresConfig, image_size: Sequence[int]) -> tuple[int, int]:
    """An image's PIL size (width, height) in the order its model takes ``image_sizes``: (width, height) under
    the ``xgenmm`` convention, (height, width) under ``llava_next``."""
    width, height = image_size
    return (int(width), int(height)) if cfg.convention == "xgenmm" else (int(height), int(width))


def map_sources(tiles: TilePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, token) of every position of the stitched crop map, each ``(rows*t, cols*t)`` long.

    Crop (r, c) is view ``1 + r*cols + c`` and fills map rows [r*t, (r+1)*t) and columns [c*t, (c+1)*t);
    its token (i, j) is number ``i*t + j``.
    """
    t = tiles.tokens_per_side
    rows, cols = tiles.map_shape
    r = torch.arange(rows).view(rows, 1)
    c = torch.arange(cols).view(1, cols)
    view = 1 + (r // t) * tiles.grid[0] + c // t  # (rows*t, cols*t)
    token = (r % t) * t + c % t
    return view, token


@dataclass(frozen=True)
class XgenmmGroups:
    """The sampler groups of one image, each ``(1+N, t*t)``: group 0 is the base view, 1..N the RAW regrouped map."""

    mask: torch.Tensor  # bool, the key-padding mask (True = keep)
    src_view: torch.Tensor  # long, which view each slot holds (0 = base, 1.. = crops in pixel order)
    src_token: torch.Tensor  # long, which token of that view (row-major)


def xgenmm_groups(tiles: TilePlan) -> XgenmmGroups:
    """xGen-MM's grouping of one image's tokens for the perceiver sampler, as its checkpoints were trained.

    The stitched map (and its unpad mask) is flattened row-major and cut into N consecutive runs of t*t
    tokens: group g >= 1 holds map tokens [(g-1)*t*t, g*t*t), which is crop g-1 only when the grid has a
    single column. Group 0 is the base view, unmasked.
    """
    t2 = tiles.tokens_per_side ** 2
    view, token = map_sources(tiles)
    n = tiles.num_crops
    base_view = torch.zeros(1, t2, dtype=torch.long)
    base_token = torch.arange(t2).view(1, t2)
    return XgenmmGroups(
        mask=torch.cat([torch.ones(1, t2, dtype=torch.bool), unpad_mask(tiles).reshape(n, t2)]),  # (1+N, t*t)
        src_view=torch.cat([base_view, view.reshape(n, t2)]),
        src_token=torch.cat([base_token, token.reshape(n, t2)]),
    )


def _check_features(features: torch.Tensor, tiles: TilePlan, where: str) -> None:
    t2 = tiles.tokens_per_side ** 2
    if features.ndim != 3 or features.shape[:2] != (tiles.num_views, t2):
        raise InputError(
            f"{where}: expected vision features of shape ({tiles.num_views}, {t2}, C) for an image of "
            f"{tiles.image_size[0]} x {tiles.image_size[1]} px (grid {tiles.grid[0]} x {tiles.grid[1]}: "
            f"{tiles.num_views} views of {t2} tokens), got {tuple(features.shape)}; drop a class token first"
        )


def xgenmm_group_features(
    features: torch.Tensor, tiles: TilePlan, where: str = "image"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's features ``(1+N, t*t, C)`` (views in pixel order) -> sampler groups ``(1+N, t*t, C)`` and
    their key-padding mask ``(1+N, t*t)`` (bool, True = keep), by :func:`xgenmm_groups`."""
    _check_features(features, tiles, where)
    groups = xgenmm_groups(tiles)
    return features[groups.src_view, groups.src_token], groups.mask


def llava_next_sources(tiles: TilePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, token) of every position of a LLaVA-NeXT image's token sequence, each ``(L,)`` long.

    The base view's t*t tokens, then the kept rows of the stitched map, each row's kept columns followed by
    one image_newline position (view :data:`NEWLINE`, token -1).
    """
    t2 = tiles.tokens_per_side ** 2
    view, token = map_sources(tiles)
    top, bottom, left, right = unpad_bounds(tiles)
    kept = bottom - top
    newline = torch.full((kept, 1), NEWLINE, dtype=torch.long)
    view = torch.cat([view[top:bottom, left:right], newline], dim=1)  # (kept_rows, kept_cols + 1)
    token = torch.cat([token[top:bottom, left:right], newline], dim=1)
    return (torch.cat([torch.zeros(t2, dtype=torch.long), view.reshape(-1)]),
            torch.cat([torch.arange(t2), token.reshape(-1)]))


def llava_next_pack(
    features: torch.Tensor, tiles: TilePlan, newline: torch.Tensor, where: str = "image"
) -> torch.Tensor:
    """One image's features ``(1+N, t*t, C)`` (views in pixel order) and the ``(C,)`` image_newline ->
    the ``(L, C)`` sequence LLaVA-NeXT places at the image's positions (see :func:`llava_next_sources`)."""
    _check_features(features, tiles, where)
    view, token = llava_next_sources(tiles)
    is_newline = (view == NEWLINE).unsqueeze(-1)  # (L, 1)
    gathered = features[view.clamp(min=0), token.clamp(min=0)]  # (L, C)
    return torch.where(is_newline, newline.to(gathered.dtype).expand_as(gathered), gathered)


def num_image_tokens(
    image_size: Sequence[int], cfg: AnyresConfig, num_latents: int | None = None, where: str = "image"
) -> int:
    """How many vision tokens the image of ``image_size`` (width, height) takes in the LM's sequence.

    xGen-MM: ``(1 + N crops) * num_latents`` (each view's group resampled to the sampler's ``num_latents``).
    LLaVA-NeXT: ``t*t`` base tokens + the unpadded map's tokens + one image_newline per kept row, as
    transformers' ``LlavaNextProcessor`` counts them for features without a class token (``num_latents``
    must be None: there is no sampler).
    """
    tiles = plan(image_size, cfg, where)
    if cfg.convention == "xgenmm":
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
            raise ConfigError("resampler.num_latents", f"xGen-MM's token count needs the sampler's number of "
                              f"latents (a positive integer), got {num_latents!r}")
        return tiles.num_views * num_latents
    if num_latents is not None:
        raise ConfigError("anyres.convention", "LLaVA-NeXT has no sampler: its token count takes no num_latents",
                          "pass num_latents=None, or use the 'xgenmm' convention")
    top, bottom, left, right = unpad_bounds(tiles)
    return tiles.tokens_per_side ** 2 + (bottom - top) * (right - left + 1)


__all__ = [
    "NEWLINE", "TilePlan", "XgenmmGroups", "candidates", "check_image_size", "fit_size", "llava_next_pack",
    "llava_next_sources", "map_sources", "model_size", "num_image_tokens", "pixel_values", "plan", "resize_and_pad",
    "select_best_resolution", "tile_views", "unpad_bounds", "unpad_mask", "view_pixels", "xgenmm_group_features",
    "xgenmm_groups",
]
