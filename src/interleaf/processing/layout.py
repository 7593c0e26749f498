"""The processor's batch layout: rows of token ids padded into tensors (left or right, with the
tokenizer's pad id), and the per-token image mask that the cross-attention family reads (which image
each token sees; IDEFICS' reset after an EOS included)."""

from __future__ import annotations

import torch

from ..errors import InputError
from .prompt_format import PromptFormat


def pad_rows(rows: list[list[int]], pad_id: int, padding, side: str, max_length: int | None):
    """Token rows -> ``input_ids`` (B, T) and ``attention_mask`` (B, T), padded on ``side`` with ``pad_id``
    (``padding``: 'longest' / True, 'max_length', or False when the rows already have one length)."""
    longest = max(len(ids) for ids in rows)
    if padding in ("longest", True):
        target = longest
    elif padding == "max_length":
        if max_length is None:
            raise InputError("padding='max_length' needs max_length (pass it, or set processor.max_length)")
        target = max(max_length, longest)
    elif padding in ("do_not_pad", False, None):
        if any(len(ids) != longest for ids in rows):
            raise InputError(
                "padding is off but the rows have different lengths; pass padding='longest' to batch them"
            )
        target = longest
    else:
        raise InputError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
    input_ids = torch.full((len(rows), target), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), target), dtype=torch.long)  # (B, T)
    for b, ids in enumerate(rows):
        n = len(ids)
        sl = slice(target - n, target) if side == "left" else slice(0, n)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, sl] = 1
    return input_ids, attention_mask


def image_attention_mask(
    input_ids: torch.Tensor, num_images: int, format: PromptFormat, eos_id: int | None,
    reset_after_eos: list[bool] | bool = False, counts: list[list[int]] | None = None,
) -> torch.Tensor:
    """(B, T) ids -> (B, T, N) long: 1 where the token's latest image at or before it is image n.

    Tokens before a row's first image see none. With ``reset_after_eos`` (IDEFICS' packed
    inputs), tokens after an EOS see no image until the next image token. ``counts``: each
    row's image token counts, when they depend on the image (LLaVA-NeXT).
    """
    b, t = input_ids.shape
    is_image = input_ids == format.image_token_id  # (B, T): the first token of each image
    if format.is_llava:  # an image is a run of image tokens: keep the first of each
        is_image = torch.zeros((b, t), dtype=torch.bool)
        for r in range(b):
            row_counts = counts[r] if counts is not None else None
            is_image[r, format.image_starts(input_ids[r].tolist(), row_counts)] = True
    latest = torch.cumsum(is_image.long(), dim=1) - 1  # (B, T): -1 before the first image
    if isinstance(reset_after_eos, bool):
        reset_after_eos = [reset_after_eos] * b
    if eos_id is not None and any(reset_after_eos):
        pos = torch.arange(t).expand(b, t)
        last_image = torch.cummax(torch.where(is_image, pos, -1), dim=1).values  # (B, T)
        last_eos = torch.cummax(torch.where(input_ids == eos_id, pos, -1), dim=1).values
        eos_before = torch.cat([torch.full((b, 1), -1), last_eos[:, :-1]], dim=1)  # strictly before
        reset = (eos_before > last_image) & torch.tensor(reset_after_eos).unsqueeze(1)
        latest = latest.masked_fill(reset, -1)
    if num_images == 0:
        return torch.zeros((b, t, 0), dtype=torch.long)
    latest = latest.masked_fill(latest >= num_images, -1)
    mask = torch.nn.functional.one_hot(latest.clamp(min=0), num_classes=num_images)  # (B, T, N)
    return mask.masked_fill((latest < 0).unsqueeze(-1), 0)
