"""One optimiser step: read the global batch's share of this process, forward and backward each
micro-batch, then update the weights, or skip the update when the loss or gradient is not finite.

The loss formula (per-sample weights, the global token count, DDP's averaging) is in
:mod:`interleaf.training.loop`.

Host synchronisation: a micro-batch (:func:`micro_batch`) reads nothing back from the device. What
the host needs of a batch (the token counts, the loss's denominator, each row's source) is counted
on the collated CPU tensors before the batch moves to the device (:func:`plan_step`); the batch
moves without waiting (:func:`to_device`); the summed losses and per-source cross-entropies stay on the
device, added up over the micro-batches. The step then reads the device once
(:func:`read_step`): the summed losses and the gradient norm, in one transfer, because the decision
to update the weights (skip a step whose loss or gradient is not finite, see
:func:`interleaf.training.progress.Progress.advance`) is the host's: the optimiser's update cannot
be undone on the device. With several processes, the global token count the loss is divided by is
an all-reduce before the first micro-batch, read once more. The per-source losses stay on the device
until the log record that reports them (:mod:`interleaf.training.report`).
"""

from __future__ import annotations

import contextlib
import math
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
    # source -> [CE sum, tokens] of this process; the CE sum may be a 0-dim float64 tensor still on the
    # device (read when a record reports it, see interleaf.training.report)
    by_source: dict[str, list] = field(default_factory=dict)
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor) on ``device`` without waiting for the device's queued work: to a GPU
    through page-locked memory with a non-blocking copy (a copy from ordinary memory may wait for
    the stream); elsewhere ``t.to(device)``."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor | None:
    """The gradients' total norm before clipping (a tensor, not read), clipping them to ``clip``;
    None when no parameter has a gradient."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return None
    norm = torch.nn.utils.clip_grad_norm_(with_grad, clip if clip is not None else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def finish_update(optimizer: torch.optim.Optimizer, finite: bool) -> None:
    """Update the weights when the step is ``finite``; zero the gradients either way."""
    if finite:
        optimizer.step()
    # else: skip the update: no optimiser step, gradients dropped
    optimizer.zero_grad(set_to_none=True)


@dataclass
class StepPlan:
    """What the host knows of a step's micro-batches from their collated CPU tensors, before any of
    them moves to the device: the loss's denominator and the counts the log reports."""

    den: float  # sum of w_i |T_i| over the global batch (every process), at least 1e-12
    counts: tuple[int, int, int]  # tokens, trained tokens, squared lengths over the global batch
    sources: list[str]  # the sources of this process's rows, in order of first appearance
    rows: list[torch.Tensor]  # per micro-batch: each row's index in ``sources`` (long, CPU)
    source_tokens: list[float]  # per source: trained tokens of this process's rows


def plan_step(raw: list[list[dict]], batches: list[dict], dist: DistState) -> StepPlan:
    """Count what the host needs on the collated CPU batches (no device work); with several
    processes, the global sums are one all-reduce on the device, read once."""
    local_den = sum(float((b["loss_weight"] * trained_tokens(b["labels"]).float()).sum()) for b in batches)
    counts = [
        float(sum(lm_tokens(b) for b in batches)), float(sum(int(trained_tokens(b["labels"]).sum()) for b in batches)),
        float(sum(squared_lengths(b) for b in batches)),
    ]
    sources: dict[str, int] = {}
    rows, source_tokens = [], []
    for samples, b in zip(raw, batches):
        index = [sources.setdefault(s.get("source", "data"), len(sources)) for s in samples]
        rows.append(torch.tensor(index, dtype=torch.long))
        source_tokens += [0.0] * (len(sources) - len(source_tokens))
        for i, n in zip(index, trained_tokens(b["labels"]).tolist()):
            source_tokens[i] += n
    local = torch.tensor([local_den, *counts], dtype=torch.float64)
    if dist.enabled:
        local = all_reduce_sum(local.to(dist.device), dist).cpu()
    den, tokens, trained, squared = local.tolist()
    return StepPlan(den=max(den, 1e-12), counts=(int(tokens), int(trained), int(squared)), sources=list(sources),
                    rows=rows, source_tokens=source_tokens)


def micro_batch(
    stage: StageConfig, wrapped: nn.Module, b: dict, rows: torch.Tensor, den: float, dist: DistState,
    sync: bool, totals: torch.Tensor, by_source: torch.Tensor,
) -> None:
    """Forward and backward one collated micro-batch; add its weighted CE and Z^2 sums to ``totals``
    (float64 (2,), on the device) and each row's CE to its source's entry of ``by_source`` (float64,
    on the device). Reads nothing back from the device."""
    device = dist.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=stage.precision == "bf16")
    move = {k: to_device(b[k], device) for k in ("input_ids", "attention_mask", "labels", "loss_weight")}
    # any-resolution images: the model reads their sizes to lay them out, so they stay on the host (no device read)
    sizes = {"image_sizes": b["image_sizes"]} if "image_sizes" in b else {}
    with _no_sync(wrapped, sync), autocast:
        out = wrapped(
            input_ids=move["input_ids"], attention_mask=move["attention_mask"],
            pixel_values=to_device(b["pixel_values"], device) if "pixel_values" in b else None, **sizes,
        )
    # without z-loss, Z is reported but not differentiated
    wce, wz, ce_rows, _ = weighted_token_loss(out.logits, move["labels"], move["loss_weight"], z_grad=bool(stage.z_loss))
    loss = (wce.sum() + stage.z_loss * wz.sum()) / den * dist.world_size
    loss.backward()
    totals += torch.stack([wce.detach().sum(), wz.detach().sum()]).double()
    by_source.index_add_(0, to_device(rows, device), ce_rows.detach().double())


def read_with_grad_norm(
    sums: torch.Tensor, stage: StageConfig, params: list[torch.Tensor]
) -> tuple[list[float], float]:
    """The step's ``sums`` (float64, on the device) and the gradients' norm before clipping, in one
    read: ``(sums as floats, grad_norm)``. The gradients are clipped on the way, whatever the loss (a
    step that is not finite drops them); no gradient at all gives a norm of 0."""
    norm = _norm(params, stage.optim.clip_grad_norm)
    norm = norm.reshape(1).to(sums) if norm is not None else sums.new_zeros(1)
    *values, grad_norm = torch.cat([sums, norm]).tolist()  # the step's one read
    return values, grad_norm


def read_step(
    stage: StageConfig, plan: StepPlan, totals: torch.Tensor, params: list[torch.Tensor]
) -> tuple[float, float, float]:
    """``(loss, z_mean, grad_norm)`` of the step, from its weighted CE and Z^2 sums ``totals`` (see
    :func:`read_with_grad_norm`); the norm is NaN when the loss is not finite."""
    (wce, wz), grad_norm = read_with_grad_norm(totals, stage, params)
    step_loss = (wce + stage.z_loss * wz) / plan.den  # float64, as the sums
    return step_loss, wz / plan.den, grad_norm if math.isfinite(step_loss) else math.nan


def optimizer_step(
    stage: StageConfig, wrapped: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
    stream, micro: int, pad_id: int, dist: DistState,
) -> StepOutcome:
    """Run one step at the learning rate already set; gradients are zeroed afterwards either way."""
    raw = [_take(stream, micro) for _ in range(stage.grad_accum)]
    batches = [_collate(samples, pad_id) for samples in raw]
    plan = plan_step(raw, batches, dist)
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)  # weighted CE, weighted Z^2
    by_source = torch.zeros(len(plan.sources), dtype=torch.float64, device=dist.device)  # CE per source
    for j, b in enumerate(batches):
        micro_batch(stage, wrapped, b, plan.rows[j], plan.den, dist, j == len(batches) - 1, totals, by_source)
    # The decision to update rests on the loss summed over every process, so all agree.
    totals = all_reduce_sum(totals, dist)
    step_loss, z_mean, grad_norm = read_step(stage, plan, totals, params)
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    finish_update(optimizer, finite)
    tokens, trained, squared = plan.counts
    return StepOutcome(
        loss=step_loss, grad_norm=grad_norm, finite=finite, z_mean=z_mean, tokens=tokens, trained=trained,
        squared_lengths=squared,
        by_source={src: [by_source[i], plan.source_tokens[i]] for i, src in enumerate(plan.sources)},
    )


__all__ = [
    "StepOutcome", "StepPlan", "finish_update", "lm_tokens", "micro_batch", "optimizer_step", "plan_step",
    "read_step", "read_with_grad_norm", "to_device",
]
