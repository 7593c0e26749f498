"""xGen-MM (BLIP-3) r-v1.5 image insertion: the parts of the token-insertion family that only it has.

Two modes, both with the perceiver token sampler as projector (``projector.kind: token_sampler``):

- **instruct** (``insertion.placement: replace`` with ``insertion.anyres.convention: xgenmm``): an image is
  a base view and a grid of crops (:mod:`interleaf.processing.anyres`); every view of every image of the
  call goes through the vision tower once; each image's features are regrouped by
  :func:`~interleaf.processing.anyres.xgenmm_group_features` (the base view, then the stitched crop map
  cut RAW into groups of t*t tokens, with key-padding masks over the canvas's padding), each group is
  resampled to ``num_latents`` tokens, and the image's sequence is the groups' tokens in group order::

      pixel_values (1+N views per image) ─► tower ─► (1+N, t*t, C) ─► groups + masks ─► sampler
          ─► (1+N, L, D) ─► flattened (L*(1+N), D) ─► replaces that image's one <image> token

  How many tokens an image takes follows from its size (width, height), so the model is given the
  sizes (``image_sizes``, xGen-MM's ``image_size``; (W, H) as PIL's ``Image.size``).
- **base** (``insertion.placement: expand``, ``tokens.image_placeholder_token_id`` set, no anyres): the
  text holds ``<image>`` followed by ``L - 1`` ``<image placeholder>`` tokens per image, and the image's
  ``L`` tokens (one view) overwrite exactly those positions; the sequence keeps its length.

Accepted layouts of ``pixel_values`` with anyres (each image a ``(V, 3, S, S)`` or ``(1, V, 3, S, S)``
tensor of its V = 1+N views, base view first): a list per row of its images (the released code's
``[[img, img], [img]]``), one flat list of the batch's images in reading order, a ``(K, V_max, 3, S, S)``
tensor of the batch's K images in reading order, each zero-padded on the view axis past its own V views
(what :class:`~interleaf.processing.InterleafProcessor` returns; an image's V follows from its size), or
``(B, N, V_max, 3, S, S)`` zero-padded per row. ``image_sizes`` follows the same nesting: per row, flat
``(K, 2)`` (the processor's), or ``(B, N, 2)``; each size is (width, height).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..processing import anyres

__all__ = [
    "check_config",
    "encode_images",
    "image_lengths",
    "is_anyres",
    "overwrite_spans",
    "prepare_replace",
    "split_images",
]


def is_anyres(model) -> bool:
    """Whether the model tiles images the xGen-MM way (``insertion.anyres.convention == "xgenmm"``)."""
    cfg = model.config.insertion_cfg.anyres
    return cfg is not None and cfg.convention == "xgenmm"


def check_config(model) -> None:
    """At construction: the sections xGen-MM's insertion needs agree with each other."""
    cfg = model.config
    tokens, insertion = cfg.tokens_cfg, cfg.insertion_cfg
    if tokens.image_placeholder_token_id is not None and insertion.placement != "expand":
        raise ConfigError("tokens.image_placeholder_token_id", "is xGen-MM's base format, which overwrites the "
                          "<image> and placeholder positions in place", "set insertion.placement: expand")
    if not is_anyres(model):
        return
    where = "insertion.anyres"
    if cfg.projector_cfg.kind != "token_sampler":
        raise ConfigError("projector.kind", f"xGen-MM's anyres groups are resampled by the token sampler, got "
                          f"{cfg.projector_cfg.kind!r}", "set projector.kind: token_sampler")
    if insertion.placement != "replace":
        raise ConfigError("insertion.placement", "xGen-MM's anyres images take a length that depends on their size",
                          "set insertion.placement: replace (one <image> token per image)")
    a = insertion.anyres
    size = model.vision_tower.image_size
    if a.base_size != size or size // a.patch_size != int(round(model.vision_tower.num_tokens ** 0.5)):
        raise ConfigError(f"{where}.base_size", f"base_size {a.base_size} / patch_size {a.patch_size} do not match "
                          f"the vision tower ({size} px, {model.vision_tower.num_tokens} tokens per view)",
                          f"set base_size: {size} and the tower's patch size")


# ------------------------------------------------------------------------------ images and their sizes


def _is_pair(value: Any) -> bool:
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and len(value) > 0 and not isinstance(value[0], (list, tuple)) \
        and not torch.is_tensor(value[0])


def _per_row(value: Any, counts: list[int], name: str, leaf_dims: int) -> list[list[Any]]:
    """``value`` (nested per row, flat in reading order, or a tensor with a row axis) as a list per row."""
    rows, total = len(counts), sum(counts)
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        value = torch.as_tensor(value)
        if value.dim() == leaf_dims + 2:  # (B, N, ...): each row's first counts[b] entries
            if value.shape[0] != rows:
                raise InputError(f"{name} has {value.shape[0]} rows but input_ids has {rows}: pass one row per row")
            for r, c in enumerate(counts):
                if c > value.shape[1]:
                    raise InputError(f"batch row {r} has {c} <image> tokens but {name} holds {value.shape[1]} "
                                     "images per row: pass one image per <image> token, in order")
            return [[value[r, k] for k in range(c)] for r, c in enumerate(counts)]
        if value.dim() != leaf_dims + 1:
            raise InputError(f"{name} has shape {tuple(value.shape)}: expected (images, ...) or (batch, images, ...)")
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be a list or a tensor, got {type(value).__name__}")
    first = value[0] if len(value) else None
    nested = isinstance(first, (list, tuple)) and not (name == "image_sizes" and _is_pair(first))
    if nested:
        if len(value) != rows:
            raise InputError(f"{name} has {len(value)} rows but input_ids has {rows}: pass one list of images per row")
        for r, (items, c) in enumerate(zip(value, counts)):
            if len(items) != c:
                raise InputError(f"batch row {r} has {c} <image> tokens but {len(items)} entries in {name}: "
                                 "every <image> token needs exactly one image, in order")
        return [list(items) for items in value]
    if len(value) != total:
        raise InputError(f"{name} holds {len(value)} images but the text of the batch has {total} <image> tokens "
                         f"(per row: {counts}): pass one image per <image> token, in order")
    out, start = [], 0
    for c in counts:
        out.append(list(value[start : start + c]))
        start += c
    return out


def split_images(
    pixel_values: Any, image_sizes: Any, counts: list[int], cfg
) -> list[list[tuple[torch.Tensor, anyres.TilePlan]]]:
    """Each row's images as ``(views (V, 3, S, S), plan)``, checked against the image sizes and the text."""
    if image_sizes is None:
        raise InputError("an xGen-MM anyres model needs image_sizes: each image's (width, height) as PIL's "
                         "Image.size gives it (the processor returns them with pixel_values)")
    pixels = _per_row(pixel_values, counts, "pixel_values", 4)
    sizes = _per_row(image_sizes, counts, "image_sizes", 1)
    out = []
    for r, (row_pixels, row_sizes) in enumerate(zip(pixels, sizes)):
        row = []
        for k, (views, size) in enumerate(zip(row_pixels, row_sizes)):
            where = f"batch row {r}, image {k}"
            if not torch.is_tensor(views):
                raise InputError(f"{where}: pixel_values must be tensors, got {type(views).__name__}")
            original = views
            if views.dim() == 5 and views.shape[0] == 1:
                views = views[0]  # the released processor's (1, V, 3, S, S)
            tiles = anyres.plan(size, cfg, where)
            n = tiles.num_views
            padded = views.dim() == 4 and views.shape[0] > n and bool(views[n:].any())  # extra views: zeros only
            if views.dim() != 4 or views.shape[0] < n or views.shape[1] != 3 or padded:
                raise InputError(
                    f"{where}: an image of {tiles.image_size[0]} x {tiles.image_size[1]} px takes a "
                    f"{tiles.grid[0]} x {tiles.grid[1]} grid, {n} views (the base view first), but its "
                    f"pixel_values have shape {tuple(original.shape)}; pass the size (width, height) the pixels were "
                    "made from, and the views as (views, 3, height, width)"
                )
            row.append((views[: tiles.num_views], tiles))
        out.append(row)
    return out


def image_lengths(model, images: list[list[tuple[torch.Tensor, anyres.TilePlan]]]) -> list[list[int]]:
    """The tokens each image takes: ``(1 + N crops) * num_latents``."""
    latents = int(model.projector.num_latents)
    return [[tiles.num_views * latents for _, tiles in row] for row in images]


def encode_images(model, images: list[list[tuple[torch.Tensor, anyres.TilePlan]]]) -> list[torch.Tensor]:
    """Every view of every image through the tower once, grouped and resampled: one ``(len, D)`` per image,
    in reading order."""
    flat = [(views, tiles) for row in images for views, tiles in row]
    if not flat:
        return []
    all_views = torch.cat([views for views, _ in flat])  # (sum V, 3, S, S)
    features = model.vision_tower(all_views[None])[0]  # (sum V, t*t, C)
    groups, masks, start = [], [], 0
    for i, (views, tiles) in enumerate(flat):
        g, m = anyres.xgenmm_group_features(features[start : start + tiles.num_views], tiles, f"image {i}")
        groups.append(g)
        masks.append(m)
        start += tiles.num_views
    tokens = model.projector(torch.cat(groups), torch.cat(masks).to(features.device))  # (G, L, D)
    out, start = [], 0
    for _, tiles in flat:
        out.append(tokens[start : start + tiles.num_views].flatten(0, 1))  # (V * L, D)
        start += tiles.num_views
    return out


def _check_fit(model, attention_mask: torch.Tensor | None, input_ids: torch.Tensor, lengths: list[list[int]]):
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if not limit:
        return
    text = attention_mask.long().sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(lengths)
    for r, (n, row) in enumerate(zip(text, lengths)):
        total = n - len(row) + sum(row)
        if total > limit:
            raise InputError(
                f"batch row {r} takes {total} positions once its images are inserted ({n - len(row)} text tokens, "
                f"images of {row} tokens) but the language model takes at most {limit}: use fewer or smaller "
                "images (a smaller size picks a smaller grid), or shorter text"
            )


def prepare_replace(model, input_ids, attention_mask, labels, pixel_values, image_sizes):
    """The instruct mode's whole insertion: ``(input_ids, attention_mask, labels, image_embeds)`` of the
    grown batch (left padded; vision positions attend and have label -100); ``image_embeds`` ``(B, S, D)``
    holds each row's images' tokens one after another."""
    from .token_insertion import expand_image_tokens

    image_id = model.image_token_id
    is_image = input_ids == image_id
    if attention_mask is not None:
        is_image = is_image & attention_mask.bool()
    counts = is_image.sum(-1).tolist()
    images = split_images(pixel_values, image_sizes, counts, model.config.insertion_cfg.anyres)
    lengths = image_lengths(model, images)
    _check_fit(model, attention_mask, input_ids, lengths)
    pad = getattr(model.config, "pad_token_id", None)
    ids, mask, labels = expand_image_tokens(
        input_ids, attention_mask, labels, lengths, image_id, pad if pad is not None else 0
    )
    sequences = encode_images(model, images)
    emb = model.get_input_embeddings()
    width, dtype = model.config.text_config.hidden_size, emb.weight.dtype
    rows = torch.zeros(len(counts), max((sum(r) for r in lengths), default=0), width, dtype=dtype,
                       device=input_ids.device)
    start = 0
    for r, c in enumerate(counts):
        if c:
            seq = torch.cat(sequences[start : start + c]).to(device=input_ids.device, dtype=dtype)
            rows[r, : seq.shape[0]] = seq
        start += c
    return ids, mask, labels, rows


# ------------------------------------------------------------------------------ base mode


def overwrite_spans(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Base mode: each ``<image>`` and the ``L - 1`` placeholders after it become ``L`` image positions.

    Returns ``input_ids`` with those placeholders written as the image token (so the ``expand`` rule
    overwrites the whole span); unchanged when the model has no placeholder token. A span may also hold
    ``<image>`` tokens (``L`` of them per image is the ``llava`` prompt format's layout, the same
    positions). An ``<image>`` whose span is cut short (by other tokens or the row's end) or a placeholder
    outside every span is an error.
    """
    placeholder = model.config.tokens_cfg.image_placeholder_token_id
    if placeholder is None:
        return input_ids
    image_id = model.image_token_id
    span = int(model.config.tokens_cfg.image_seq_length)
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    for r, (ids, real) in enumerate(zip(input_ids.tolist(), keep.tolist())):
        covered = [False] * len(ids)
        for p, token in enumerate(ids):
            if token != image_id or not real[p] or covered[p]:
                continue
            run = ids[p + 1 : p + span]
            fits = [t in (placeholder, image_id) for t in run]  # the processor's "llava" layout writes <image>s
            if len(run) != span - 1 or not all(fits) or not all(real[p : p + span]):
                got = next((i for i, ok in enumerate(fits) if not ok), len(run))
                raise InputError(
                    f"batch row {r}: the <image> at position {p} is followed by {got} <image placeholder> "
                    f"tokens, but an image takes {span} positions: write '<image>' + '<image placeholder>' x "
                    f"{span - 1} for each image (the image's tokens overwrite them)"
                )
            covered[p : p + span] = [True] * span
        stray = [p for p, t in enumerate(ids) if t == placeholder and real[p] and not covered[p]]
        if stray:
            raise InputError(f"batch row {r}: <image placeholder> at position {stray[0]} follows no <image> token; "
                             f"each image is '<image>' + '<image placeholder>' x {span - 1}")
    return input_ids.masked_fill((input_ids == placeholder) & keep, image_id)


def sizes_from_kwargs(kwargs: dict[str, Sequence | torch.Tensor | None]) -> Any:
    """Pop ``image_sizes`` (or xGen-MM's spelling ``image_size``) from a call's keyword arguments."""
    sizes = kwargs.pop("image_sizes", None)
    other = kwargs.pop("image_size", None)
    if sizes is not None and other is not None:
        raise InputError("pass either image_sizes or image_size, not both")
    return sizes if sizes is not None else other
