"""Model FLOPs of a training step, and the model FLOPs utilisation (MFU) the trainer reports.

What is counted, per position the LM attends (``tokens``; an image the model grows counts at its
grown length), with ``N`` the weights of the matrix products every position goes through (the LM's
layers and output head, and the cross-attention blocks; not the input-embedding lookup) and
``N_t`` those of them that train::

    forward                                  2 N
    backward, gradients of the activations   2 N      (through frozen parts too: whatever trains
                                                       below them needs these gradients)
    backward, gradients of the weights       2 N_t    (only the weights that train)

plus the attention products (``Q K^T`` and ``A V``) of each of the ``L`` layers, in the usual
non-causal count: ``4 L d T`` per position forward and twice that backward, ``12 L d T`` in all,
with ``d`` the attention width (heads x head size) and ``T`` the length of the position's row::

    step FLOPs = (4 N + 2 N_t) * tokens + 12 L d * sum over rows of T_row^2

With everything trainable this is the standard ``6 N + 12 L d T`` per token. A step where nothing
trains has no backward pass: ``2 N * tokens + 4 L d * sum T_row^2``. Not counted: the vision tower,
the resampler or projector (they act once per image, not per position), the cross-attention over
the image latents, norms, activations and the loss; the MFU is therefore a slight underestimate.

The MFU is the FLOPs per second over the peak of the machines: ``stage.peak_flops`` (FLOP/s of one
device, e.g. ``9.89e14`` for an H100's dense bf16) times the number of processes. Without it, a
CUDA device in ``bf16`` whose name is in :data:`PEAK_BF16` uses that value; otherwise (a CPU) the
MFU is left out and only the FLOPs per second are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets, by a part of the
# device name torch reports; the first match wins, so the longer names come first.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("A10G", 70e12), ("L4", 121e12),
)


@dataclass(frozen=True)
class FlopCount:
    """The model's part of the step FLOPs (see the module docstring)."""

    path: int  # N: weights of the matrix products every LM position goes through
    trainable_path: int  # N_t: those of them that train
    layers: int  # L
    attention_width: int  # d
    trains: bool  # some weight of the model trains (there is a backward pass)

    def step(self, tokens: int, squared_lengths: int) -> float:
        """FLOPs of a step over ``tokens`` positions whose rows' squared lengths sum to ``squared_lengths``."""
        if not self.trains:
            return 2.0 * self.path * tokens + 4.0 * self.layers * self.attention_width * squared_lengths
        return (4.0 * self.path + 2.0 * self.trainable_path) * tokens + (
            12.0 * self.layers * self.attention_width * squared_lengths
        )


def flop_count(model: nn.Module) -> FlopCount:
    """Count ``model``'s weights for :class:`FlopCount` (call before sharding: FSDP2 splits the weights)."""
    lm = model.language_model
    head = lm.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    lookup = {id(p) for p in lm.get_input_embeddings().parameters()} - head_ids
    path = {id(p): p for p in lm.parameters() if id(p) not in lookup}  # unique: a tied head counts once
    cfg = lm.config
    heads = cfg.num_attention_heads
    width = heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return FlopCount(
        path=sum(p.numel() for p in path.values()),
        trainable_path=sum(p.numel() for p in path.values() if p.requires_grad),
        layers=int(cfg.num_hidden_layers), attention_width=int(width),
        trains=any(p.requires_grad for p in model.parameters()),
    )


def squared_lengths(batch: dict) -> int:
    """Sum over a collated batch's rows of the squared number of positions the LM sees."""
    lengths = batch["lm_lengths"] if "lm_lengths" in batch else batch["attention_mask"].sum(-1)
    return int((lengths.long() ** 2).sum())


def device_peak_flops(peak_flops: float | None, device: torch.device, precision: str) -> float | None:
    """One device's peak FLOP/s: ``peak_flops`` when set, else :data:`PEAK_BF16` for a known CUDA
    device in bf16, else None (no MFU)."""
    if peak_flops is not None:
        return float(peak_flops)
    if device.type != "cuda" or precision != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16 if part in name), None)


__all__ = ["FlopCount", "PEAK_BF16", "device_peak_flops", "flop_count", "squared_lengths"]
