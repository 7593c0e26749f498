"""One optimiser step: read the global batch's share of this process, forward and backward each
micro-batch, then update the weights, or skip the update when the loss or gradient is not finite.

The loss formula (per-sample weights, the global token count, DDP's averaging) is in
:mod:`interleaf.training.loop`.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..model.loss import trained_tokens, weighted_token_loss
from .config import StageConfig
from .distributed import DistState, all_reduce_sum
from .flops import squared_lengths


@dataclass
class StepOutcome:
    """What one optimiser step measured (the same on every process, except ``by_source``)."""

    loss: float  # the step's loss L over the global batch (NaN or inf when the step was skipped)
    grad_norm: float  # before clipping; NaN when the loss was not finite
    finite: bool  # the weights were updated
    z_mean: float  # sum of w * Z^2 over the global batch / the weighted token count
    tokens: int  # positions the LM attends in the global batch (grown images at their length)
    trained: int  # trained positions in the global batch
    squared_lengths: int = 0  # sum over the global batch's rows of (positions the LM sees)^2 (attention FLOPs)
    by_source: dict[str, list[float]] = field(default_factory=dict)  # source -> [CE sum, tokens], this process
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own values (DPO: rewards), logged as they are


def _take(stream, n: int) -> list[dict]:
    """The next ``n`` samples of ``stream``; a stream that runs dry is a :class:`ConfigError`."""
    if hasattr(stream, "take"):
        samples = stream.take(n)
    else:
        it = iter(stream)
        samples = [s for _, s in zip(range(n), it)]
    if len(samples) < n:
        raise ConfigError("data", f"the data stream ended after {len(samples)} of {n} samples of a batch")
    return samples


def _collate(samples: list[dict], pad_token_id: int) -> dict:
    from ..data.collate import collate

    return collate(samples, pad_token_id)


def lm_tokens(batch: dict) -> int:
    """Positions the LM sees in a collated batch: each row's ``lm_lengths`` (longer than its text when the
    model grows images), else its attended text tokens."""
    if "lm_lengths" in batch:
        return int(batch["lm_lengths"].sum())
    return int(batch["attention_mask"].sum())


def _no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(with_grad, clip if clip is not None else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def apply_update(
    stage: StageConfig, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], step_loss: float
) -> tuple[float, bool]:
    """Clip and update after the backward passes, or skip the update when the loss or the gradient
    norm is not finite; gradients are zeroed either way. Returns ``(grad_norm, updated)``."""
    grad_norm = _grad_norm(params, stage.optim.clip_grad_norm) if math.isfinite(step_loss) else math.nan
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    # else: skip the update: no optimiser step, gradients dropped
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def optimizer_step(
    stage: StageConfig, wrapped: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
    stream, micro: int, pad_id: int, dist: DistState,
) -> StepOutcome:
    """Run one step at the learning rate already set; gradients are zeroed afterwards either way."""
    device = dist.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=stage.precision == "bf16")
    raw = [_take(stream, micro) for _ in range(stage.grad_accum)]
    batches = [_collate(samples, pad_id) for samples in raw]
    local_den = sum(float((b["loss_weight"] * trained_tokens(b["labels"]).float()).sum()) for b in batches)
    den = float(all_reduce_sum(torch.tensor([local_den], dtype=torch.float64), dist)[0])
    den = max(den, 1e-12)
    totals = torch.zeros(5, dtype=torch.float64)  # weighted CE, weighted Z^2, tokens, trained tokens, squared lengths
    by_source: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for j, b in enumerate(batches):
        with _no_sync(wrapped, j == len(batches) - 1), autocast:
            out = wrapped(
                input_ids=b["input_ids"].to(device),
                attention_mask=b["attention_mask"].to(device),
                pixel_values=b["pixel_values"].to(device) if "pixel_values" in b else None,
            )
        # without z-loss, Z is reported but not differentiated
        wce, wz, ce_rows, counts = weighted_token_loss(out.logits, b["labels"], b["loss_weight"], z_grad=bool(stage.z_loss))
        loss = (wce.sum() + stage.z_loss * wz.sum()) / den * dist.world_size
        loss.backward()
        totals += torch.tensor(
            [float(wce.detach().sum()), float(wz.detach().sum()), float(lm_tokens(b)), float(counts.sum()),
             float(squared_lengths(b))],
            dtype=torch.float64,
        )
        for src, c, n in zip((x.get("source", "data") for x in raw[j]), ce_rows.detach().tolist(), counts.tolist()):
            by_source[src][0] += c
            by_source[src][1] += n
    # The decision to update rests on the loss summed over every process, so all agree.
    totals = all_reduce_sum(totals, dist)
    step_loss = float((totals[0] + stage.z_loss * totals[1]) / den)
    grad_norm, finite = apply_update(stage, optimizer, params, step_loss)
    return StepOutcome(
        loss=step_loss, grad_norm=grad_norm, finite=finite, z_mean=float(totals[1] / den),
        tokens=int(totals[2]), trained=int(totals[3]), squared_lengths=int(totals[4]), by_source=by_source,
    )


__all__ = ["StepOutcome", "apply_update", "lm_tokens", "optimizer_step"]
