"""Batching tokenised samples for training (right padding).

::

    samples: [{"input_ids": [T_b], "labels": [T_b], "images": [N_b x (3, S, S)], "loss_weight": w_b}, ...]
    collate ─► input_ids (B, T) long      pad_token_id after each row's tokens
               attention_mask (B, T) long 1 on tokens, 0 on padding
               labels (B, T) long         -100 on padding (and wherever the sample had -100)
               pixel_values (B, N_max, 3, S, S) float, zero-padded; absent when no sample has images
               loss_weight (B,) float
               lm_lengths (B,) long       each row's length in the LM: its tokens, or the sample's
                                          "lm_length" when the model grows its images (placement replace)

Any-resolution tiling (LLaVA-NeXT, xGen-MM instruct): samples carry ``"image_sizes"`` and each image
is its views ``(V, 3, S, S)`` (:func:`interleaf.data.tokenize.encode_sample`). The batch then holds
the images as the processor returns them for these models::

    pixel_values (K, V_max, 3, S, S) float  the batch's K images in reading order (row by row), each
                                            image's views zero-padded to the most any image has
    image_sizes (K, 2) long                 each image's size as the sample gave it (the model's order:
                                            (height, width) for LLaVA-NeXT, (width, height) for xGen-MM)

Both are absent when no sample has an image; a sample without images adds none (a text-only row).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ..errors import InputError
from ..processing.prompt_format import IGNORE_INDEX


def collate(samples: list[dict], pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of sample dicts into a batch of tensors (see the module docstring)."""
    if not samples:
        raise InputError("collate: the batch is empty")
    for b, s in enumerate(samples):
        if len(s["input_ids"]) != len(s["labels"]):
            raise InputError(f"collate: sample {b} has {len(s['input_ids'])} input_ids but {len(s['labels'])} labels")
    t = max(len(s["input_ids"]) for s in samples)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, t), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, t), dtype=torch.long)  # (B, T)
    labels = torch.full((batch, t), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(s["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_weight": torch.tensor([float(s.get("loss_weight", 1.0)) for s in samples]),  # (B,)
        "lm_lengths": torch.tensor([int(s.get("lm_length", len(s["input_ids"]))) for s in samples]),  # (B,)
    }
    if any("image_sizes" in s for s in samples):
        out.update(_tiled_images(samples))
    else:
        out.update(_one_view_images(samples))
    return out


def _one_view_images(samples: list[dict]) -> dict:
    """``pixel_values`` (B, N_max, 3, S, S), each row's images first, then zeros; nothing without images."""
    n_max = max(len(s.get("images", [])) for s in samples)
    if not n_max:
        return {}
    first = next(img for s in samples for img in s["images"])
    pixels = torch.zeros((len(samples), n_max, *first.shape), dtype=first.dtype)  # (B, N_max, 3, S, S)
    for b, s in enumerate(samples):
        for n, img in enumerate(s.get("images", [])):
            if img.shape != first.shape:
                raise InputError(f"collate: sample {b} image {n} has shape {tuple(img.shape)}, expected {tuple(first.shape)}")
            pixels[b, n] = img
    return {"pixel_values": pixels}


def _tiled_images(samples: list[dict]) -> dict:
    """Any-resolution images: ``pixel_values`` (K, V_max, 3, S, S) in reading order, views zero-padded,
    and ``image_sizes`` (K, 2); nothing when no sample has an image."""
    images, sizes = [], []
    for b, s in enumerate(samples):
        own = s.get("images", [])
        if "image_sizes" not in s and own:
            raise InputError(
                f"collate: sample {b} has {len(own)} images but no image_sizes, while other samples of the batch "
                "have them (any-resolution images); tokenise every sample with the same processor "
                "(interleaf.data.tokenize.encode_sample)"
            )
        own_sizes = s.get("image_sizes", [])
        if len(own_sizes) != len(own):
            raise InputError(f"collate: sample {b} has {len(own)} images but {len(own_sizes)} image_sizes; give one "
                             "size per image, in order (as encode_sample writes them)")
        for n, (img, size) in enumerate(zip(own, own_sizes)):
            if img.dim() != 4 or (images and img.shape[1:] != images[0].shape[1:]):
                expected = f"(views, {', '.join(map(str, images[0].shape[1:]))})" if images else "(views, 3, S, S)"
                raise InputError(f"collate: sample {b} image {n} has shape {tuple(img.shape)}, expected {expected}: "
                                 "an any-resolution image is its views, as encode_sample makes them")
            if len(size) != 2:
                raise InputError(f"collate: sample {b} image {n} has image_sizes entry {tuple(size)!r}, not a pair")
            images.append(img)
            sizes.append(tuple(int(x) for x in size))
    if not images:
        return {}
    pixels = pad_sequence(images, batch_first=True)  # (K, V_max, 3, S, S), views zero-padded
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes, dtype=torch.long)}  # (K, 2)


__all__ = ["collate"]
