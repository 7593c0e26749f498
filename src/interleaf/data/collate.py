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
"""

from __future__ import annotations

import torch

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
    n_max = max(len(s.get("images", [])) for s in samples)
    if n_max:
        first = next(img for s in samples for img in s["images"])
        pixels = torch.zeros((batch, n_max, *first.shape), dtype=first.dtype)  # (B, N_max, 3, S, S)
        for b, s in enumerate(samples):
            for n, img in enumerate(s.get("images", [])):
                if img.shape != first.shape:
                    raise InputError(f"collate: sample {b} image {n} has shape {tuple(img.shape)}, expected {tuple(first.shape)}")
                pixels[b, n] = img
        out["pixel_values"] = pixels
    return out


__all__ = ["collate"]
