"""LLaVA-NeXT's images in the token-insertion model: every view of every image through the tower and
the projector once, then each image packed as LLaVA-NeXT does (:func:`interleaf.processing.anyres.llava_next_pack`:
the base view's tokens, the unpadded grid of crop tokens with a learned ``image_newline`` closing each
row) and laid out by row for :func:`interleaf.model.token_insertion.write_image_embeddings`.

``image_sizes`` gives each image's original (height, width), as transformers' LLaVA-NeXT takes it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..processing import anyres as anyres_tiling

__all__ = ["check_llava_next", "llava_next_anyres", "llava_next_image_features", "llava_next_rows"]


def llava_next_anyres(model):
    """The model's :class:`~interleaf.config.AnyresConfig` when it tiles as LLaVA-NeXT does, else None."""
    cfg = model.config.insertion_cfg.anyres
    return cfg if cfg is not None and cfg.convention == "llava_next" else None


def check_llava_next(model) -> None:
    """At construction of a LLaVA-NeXT model: the tiling must fit the tower, and the projector gets
    ``image_newline`` (one vector at the LM's width, LLaVA-NeXT's learned end-of-row embedding; it
    belongs to the projector, so it trains with it)."""
    cfg = model.config
    tiles = cfg.insertion_cfg.anyres
    if cfg.insertion_cfg.placement != "expand":
        raise ConfigError("insertion.placement", "LLaVA-NeXT tiling writes its features over expanded <image> runs",
                          "set insertion.placement: expand")
    if getattr(model.projector, "num_latents", None) is not None:
        raise ConfigError("projector.kind", "LLaVA-NeXT tiling packs every vision token; a resampling projector "
                          "has none to pack", "use projector.kind mlp2x_gelu or linear")
    tower = model.vision_tower
    if tiles.base_size != tower.image_size:
        raise ConfigError("insertion.anyres.base_size", f"is {tiles.base_size} but the vision tower takes "
                          f"{tower.image_size} px images", f"set insertion.anyres.base_size: {tower.image_size}")
    t = tiles.base_size // tiles.patch_size
    if tower.num_tokens != t * t:
        raise ConfigError("insertion.anyres.patch_size", f"a view gives {tower.num_tokens} vision tokens, not the "
                          f"{t} x {t} grid that base_size {tiles.base_size} / patch_size {tiles.patch_size} lays out",
                          "set patch_size to the tower's, and drop CLIP's class token (vision.drop_cls_token: true)")
    width = cfg.text_config.hidden_size
    if not isinstance(getattr(model.projector, "image_newline", None), nn.Parameter):
        weight = next(model.projector.parameters())
        newline = torch.randn(width, dtype=weight.dtype, device=weight.device) / width ** 0.5  # LLaVA-NeXT's init
        model.projector.register_parameter("image_newline", nn.Parameter(newline))


def _image_sizes(image_sizes, count: int) -> list[tuple[int, int]]:
    """``image_sizes`` rows ``(height, width)`` -> a list of (width, height), checked against ``count`` images."""
    if image_sizes is None:
        raise InputError("a LLaVA-NeXT model needs image_sizes with pixel_values: the (height, width) of each "
                         "original image, which the processor returns with the pixels")
    rows = image_sizes.tolist() if torch.is_tensor(image_sizes) else [list(s) for s in image_sizes]
    if len(rows) != count:
        raise InputError(f"image_sizes has {len(rows)} rows but pixel_values holds {count} images: pass one "
                         "(height, width) per image, as the processor returns them")
    out = []
    for k, row in enumerate(rows):
        if len(row) != 2:
            raise InputError(f"image_sizes row {k} is {row!r}, not a (height, width) pair")
        out.append((int(row[1]), int(row[0])))
    return out


def _views(pixel_values: torch.Tensor, plans: list) -> torch.Tensor:
    """Every image's own views, base first, in image order -> ``(sum of views, 3, S, S)``."""
    needed = [p.num_views for p in plans]
    if pixel_values.dim() == 4:  # already flat: the images' views one after another
        if pixel_values.shape[0] != sum(needed):
            raise InputError(f"pixel_values holds {pixel_values.shape[0]} views but the images' sizes call for "
                             f"{sum(needed)} ({needed} per image): process the images with the model's processor")
        return pixel_values
    for k, (n, p) in enumerate(zip(needed, plans)):
        if n > pixel_values.shape[1]:
            raise InputError(
                f"image {k}: its size {p.image_size[0]} x {p.image_size[1]} px (width x height) calls for {n} "
                f"views (grid {p.grid[0]} x {p.grid[1]} + base) but pixel_values holds {pixel_values.shape[1]} per "
                "image: pass image_sizes and pixels from the same processor call")
    return torch.cat([pixel_values[k, :n] for k, n in enumerate(needed)])


def llava_next_image_features(model, pixel_values: torch.Tensor, image_sizes) -> list[torch.Tensor]:
    """Each image's packed embeddings ``(L_k, D)``, in image order (see the module docstring).

    ``pixel_values``: ``(K, max_views, 3, S, S)`` or ``(sum of views, 3, S, S)``; ``image_sizes``:
    ``(K, 2)`` rows (height, width) of the original images.
    """
    tiles = llava_next_anyres(model)
    if not torch.is_tensor(pixel_values) or pixel_values.dim() not in (4, 5):
        raise InputError("pixel_values of a LLaVA-NeXT model must be (images, views, 3, height, width) or "
                         f"(views, 3, height, width), got {getattr(pixel_values, 'shape', type(pixel_values))}")
    count = pixel_values.shape[0] if pixel_values.dim() == 5 else len(image_sizes if image_sizes is not None else [])
    sizes = _image_sizes(image_sizes, count)
    plans = [anyres_tiling.plan(size, tiles, where=f"image {k}") for k, size in enumerate(sizes)]
    if not plans:
        return []
    views = _views(pixel_values, plans)  # (sum of views, 3, S, S)
    features = model.vision_tower(views[None])[0]  # (sum of views, t*t, Dv)
    projected = model.projector(features)  # (sum of views, t*t, D)
    newline = model.projector.image_newline
    out, start = [], 0
    for k, p in enumerate(plans):
        out.append(anyres_tiling.llava_next_pack(projected[start : start + p.num_views], p, newline, f"image {k}"))
        start += p.num_views
    return out


def llava_next_rows(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_sizes) -> torch.Tensor:
    """The images of a batch packed and laid out by row -> ``(B, S, D)`` for :func:`write_image_embeddings`.

    Images are taken in reading order: each row's ``<image>`` tokens are covered by as many of the
    next images as add up to them exactly; an error names the row where they do not.
    """
    packed = llava_next_image_features(model, pixel_values, image_sizes)
    counts = (input_ids == model.image_token_id).sum(-1).tolist()  # (B,)
    emb = model.get_input_embeddings()
    width, dtype = model.config.text_config.hidden_size, emb.weight.dtype
    rows = torch.zeros(len(counts), max(counts, default=0), width, dtype=dtype, device=input_ids.device)
    k = 0
    for r, count in enumerate(counts):
        filled, taken = 0, []
        while filled < count and k < len(packed):
            taken.append(packed[k].shape[0])
            rows[r, filled : filled + taken[-1]] = packed[k].to(device=input_ids.device, dtype=dtype)
            filled += taken[-1]
            k += 1
        if filled != count:
            raise InputError(
                f"batch row {r} has {count} image tokens but its images take {filled} ({taken} each, the images "
                "in reading order): each image needs exactly its token count of <image> tokens; write the text "
                "and the images through the same processor call")
    if k != len(packed):
        raise InputError(f"{len(packed)} images were given but the text of the batch has <image> tokens for {k}: "
                         "pass one image per image in the prompts, in order")
    return rows
