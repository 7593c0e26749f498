"""A token-insertion batch's images, encoded once and kept across ``generate`` calls.

The token-insertion counterpart of :class:`~interleaf.model.cross_attention.MediaCache`: what
:meth:`~interleaf.model.InterleafForConditionalGeneration.prepare_media` returns for
``fusion: token_insertion``, so that a caller (a server that keeps a batch across calls) continues a batch over
several ``generate`` calls with its KV cache and drops finished rows, without knowing the family::

    media = model.prepare_media(input_ids, pixel_values, attention_mask)        # images encoded here
    out = model.generate(input_ids, attention_mask=mask, media_cache=media, past_key_values=cache, ...)
    out = model.generate(out, attention_mask=longer_mask, media_cache=media, past_key_values=cache, ...)
    media = media.select(rows); cache.batch_select_indices(rows)                 # keep some rows

With ``replace`` placement (xGen-MM) the model grows each ``<image>`` into the image's tokens, so
the KV cache holds the grown prompt while the caller keeps its own, shorter one. The object keeps
the grown prompt and swaps it in on every call: the caller's rows go in (its prompt followed by the
tokens generated so far) and come back the same way, with the new tokens after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from . import token_insertion


@dataclass
class InsertedImages:
    """Image embeddings of a batch's rows and, with ``replace`` placement, the grown prompt.

    ``image_embeds`` (B, S, D): row b's images' embeddings, one after another, then zeros
    (:func:`~interleaf.model.token_insertion.encode_rows`). ``prompt_width``: the caller's prompt
    width T0. ``grown_ids`` / ``grown_mask`` (B, T1): the prompt as the model runs it (``replace``
    placement only; ``None`` when the caller's prompt is already in the model's layout).
    """

    image_embeds: torch.Tensor
    prompt_width: int
    grown_ids: torch.Tensor | None = None
    grown_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.image_embeds.shape[0]

    def select(self, rows: torch.Tensor) -> "InsertedImages":
        """The same images for the batch rows ``rows`` (indices, in their new order)."""
        pick = (lambda t: None if t is None else t[rows.to(t.device)])  # noqa: E731
        return InsertedImages(pick(self.image_embeds), self.prompt_width, pick(self.grown_ids), pick(self.grown_mask))


def prepare(model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
            attention_mask: torch.Tensor | None = None, image_sizes=None) -> InsertedImages:
    """Encode the batch's images once (and grow its prompt with ``replace`` placement), as
    :func:`interleaf.model.token_insertion.generate` does; ``image_sizes`` for any-resolution models."""
    grown_ids, grown_mask, image_embeds = token_insertion.prepare_images(
        model, input_ids, attention_mask, pixel_values, image_sizes
    )
    return InsertedImages(image_embeds, input_ids.shape[1], grown_ids, grown_mask)


def generate(model, generate_fn, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             media: InsertedImages, kwargs: dict):
    """``generate_fn`` (transformers' ``generate``) on the caller's rows with images from ``media``.

    ``input_ids`` is the caller's prompt (the one ``media`` was prepared with) and any tokens
    generated after it; the result is ``input_ids`` followed by the new tokens.
    """
    if not isinstance(media, InsertedImages):
        raise InputError(
            f"media_cache is a {type(media).__name__}, not what this token-insertion model's prepare_media "
            "returns: prepare it with model.prepare_media(input_ids, pixel_values, attention_mask)"
        )
    if input_ids.shape[0] != media.rows or input_ids.shape[1] < media.prompt_width:
        raise InputError(
            f"input_ids {tuple(input_ids.shape)} does not continue the batch media_cache was prepared for "
            f"({media.rows} rows, prompt of {media.prompt_width} tokens): pass that prompt and the tokens "
            "generated after it, and select the same rows of both"
        )
    kwargs = {**kwargs, "image_embeds": media.image_embeds}
    if media.grown_ids is None:
        return generate_fn(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    after = input_ids[:, media.prompt_width:]  # tokens generated in earlier calls (B, T - T0)
    ids = torch.cat([media.grown_ids.to(input_ids.device), after], dim=1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([media.grown_mask.to(attention_mask.device), attention_mask[:, media.prompt_width:]], dim=1)
    out = generate_fn(input_ids=ids, attention_mask=mask, **kwargs)
    if not torch.is_tensor(out):
        return out
    mine = input_ids.to(out.device).repeat_interleave(out.shape[0] // input_ids.shape[0], dim=0)
    return torch.cat([mine, out[:, ids.shape[1]:]], dim=1)
