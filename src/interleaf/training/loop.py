"""The training loop: build the stage's model, stream its mixture, optimise, checkpoint, log.

The loss of one optimiser step, over its whole global batch (every micro-batch of every process),
with per-sample loss weights ``w_i`` (the source's ``loss_weight``), trained positions ``T_i``
(labels != -100 after the shift), per-token cross-entropy ``CE_it`` and log-partition ``Z_it``::

    L = ( sum_i w_i sum_{t in T_i} CE_it  +  z_loss * sum_i w_i sum_{t in T_i} Z_it^2 )
        / sum_i w_i |T_i|

With every ``w_i = 1`` this is the model's own loss (the mean over trained tokens). The
denominator is summed over processes before the backward pass, and each process's loss is
multiplied by the number of processes because DDP and FSDP average gradients: the gradient is
then exactly that of ``L``, whatever the split into processes and accumulation steps.

``batch_size`` is the global batch (samples per optimiser step); each process takes
``batch_size / (processes * grad_accum)`` samples per micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import distributed
from ..errors import CheckpointError, ConfigError
from . import checkpoint as ckpt
from .config import Recipe, StageConfig, llava_mixture, load_recipe
from .distributed import DistState, all_reduce_sum, barrier, current_state, gather_objects, unwrap, wrap_model
from .logging import MetricsLogger, Throughput, write_summary
from .optim import build_optimizer, lr_factor, set_lr

IGNORE_INDEX = -100
StreamFactory = Callable[[StageConfig, Any, int, int], Iterable[dict]]


@dataclass
class StageResult:
    name: str
    out: Path
    final: Path
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums over trained positions: ``(w * sum CE, w * sum Z^2, sum CE, count)``; each (B,).

    ``logits`` (B, T, V) predict ``labels`` shifted by one; ``weights`` (B,).
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    mask = (shift_labels != IGNORE_INDEX).float()  # (B, T-1)
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(mask)  # (B, T-1)
    z = torch.logsumexp(shift_logits, dim=-1).pow(2) * mask  # (B, T-1)
    ce_rows = ce.sum(-1)  # (B,)
    w = weights.to(ce_rows.device, ce_rows.dtype)
    return w * ce_rows, w * z.sum(-1), ce_rows, mask.sum(-1)


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Trained positions per row after the shift, (B,)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def _build_model(stage: StageConfig, finals: dict[str, Path]):
    from ..api import build, load

    spec = stage.model
    if spec.from_stage is not None:
        if spec.from_stage not in finals:
            raise ConfigError("model.from_stage", f"stage {spec.from_stage!r} has not run in this recipe")
        model, processor = load(finals[spec.from_stage])
    elif spec.path is not None:
        model, processor = load(spec.path)
    else:
        model, processor = build(spec.preset, seed=stage.seed, **spec.options)
    return model, processor


def prepare_model(model: nn.Module, stage: StageConfig) -> int:
    """Apply the stage's freezing, z-loss and gradient checkpointing; returns the trainable count."""
    model.config.z_loss = float(stage.z_loss)
    if stage.freeze is not None:
        model.config.freeze = stage.freeze
    model.apply_freeze(stage.freeze)
    backbone = getattr(model.vision_tower, "backbone", None)
    if backbone is not None and hasattr(backbone, "unused_parameters"):  # layers past the feature layer
        for p in backbone.unused_parameters():
            p.requires_grad_(False)
    if stage.gradient_checkpointing:
        lm = model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model.num_trainable_parameters()


def default_stream(stage: StageConfig, processor, rank: int, world_size: int):
    """The stage's :class:`~interleaf.data.stream.MixtureStream` (this process's share)."""
    from ..data.stream import MixtureStream

    return MixtureStream(stage.mixture(), processor, seed=stage.seed, rank=rank, world_size=world_size)


def _take(stream, n: int) -> list[dict]:
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


def _bad_counts(stream) -> dict:
    bad = getattr(stream, "bad", None)
    return bad.to_dict() if bad is not None and hasattr(bad, "to_dict") else {}


def _merge_bad(dicts: list[dict]) -> dict:
    seen: dict[str, int] = defaultdict(int)
    bad: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for d in dicts:
        for s, n in d.get("seen", {}).items():
            seen[s] += n
        for s, reasons in d.get("bad", {}).items():
            for r, n in reasons.items():
                bad[s][r] += n
    return {"seen": dict(seen), "bad": {s: dict(r) for s, r in bad.items()}}


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


def _save_final(model: nn.Module, processor, out: Path, dist: DistState) -> Path:
    """Write ``OUT/final`` (a save_pretrained directory) atomically."""
    from ..api import save

    final, tmp = out / "final", out / ".tmp-final"
    inner = unwrap(model)
    sharded = any(hasattr(p, "device_mesh") for p in inner.parameters())
    state = None
    if sharded:  # FSDP2: gather full tensors (collective), then write from the main process
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        if state is not None:
            tmp.mkdir(parents=True)
            inner.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
        else:
            save(inner, processor, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier(dist)
    return final


# --------------------------------------------------------------------------- one stage


def train_stage(
    stage: StageConfig,
    *,
    resume: bool = False,
    finals: dict[str, Path] | None = None,
    stream_factory: StreamFactory | None = None,
    progress: bool = True,
    dist: DistState | None = None,
) -> StageResult:
    """Train one stage to ``stage.max_steps``; writes ``OUT/final``, ``OUT/metrics.jsonl``, ``OUT/summary.json``.

    ``resume=True`` continues from the latest checkpoint in ``OUT/checkpoints`` (or starts afresh
    when there is none). ``stream_factory(stage, processor, rank, world_size)`` replaces the
    stage's mixture stream (tests, custom data). ``dist`` is the process group's state (default: the
    group already initialised, see :mod:`interleaf.distributed`); no group is created here.
    """
    import yaml

    dist = dist or current_state()
    out = Path(stage.out)
    latest = ckpt.latest_checkpoint(out) if resume else None
    if not resume and (ckpt.list_checkpoints(out) or (out / "final").exists()):
        raise ConfigError(
            "out", f"{str(out)!r} already holds a training run (checkpoints or final)",
            "pass --resume to continue it, or choose another --out",
        )
    seed_everything(stage.seed)
    model, processor = _build_model(stage, finals or {})
    n_trainable = prepare_model(model, stage)
    fingerprint = ckpt.frozen_fingerprint(model)
    if next(model.parameters()).device != dist.device:
        model.to(dist.device)
    wrapped = wrap_model(model, stage.distributed.strategy, dist)
    inner = unwrap(wrapped)
    optimizer = build_optimizer(inner, stage.optim)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    per_rank = stage.batch_size // stage.grad_accum
    if per_rank % dist.world_size:
        raise ConfigError(
            "batch_size", f"{stage.batch_size} samples per step cannot be split evenly over {dist.world_size} "
            f"processes x {stage.grad_accum} accumulation steps",
            "make batch_size a multiple of processes x grad_accum",
        )
    micro = per_rank // dist.world_size
    stream = (stream_factory or default_stream)(stage, processor, dist.rank, dist.world_size)

    step, tokens_seen, trained_seen, samples_seen, elapsed_before = 0, 0, 0, 0, 0.0
    if latest is not None:
        state, data_state = ckpt.load_checkpoint(latest, model=inner, optimizer=optimizer, dist=dist, fingerprint=fingerprint)
        stream.load_state_dict(data_state)
        step = int(state["step"])
        tokens_seen, trained_seen = int(state["tokens_seen"]), int(state["trained_tokens_seen"])
        samples_seen, elapsed_before = int(state["samples_seen"]), float(state["elapsed_s"])
        changed = sorted(k for k, v in stage.to_dict().items() if state.get("config", {}).get(k) != v and k != "max_steps")
        if dist.is_main:
            print(f"resuming from {latest} at step {step}", flush=True)
            if changed:
                print(f"warning: settings changed since the checkpoint: {', '.join(changed)}", flush=True)
    elif resume and dist.is_main:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(stage.to_dict(), sort_keys=False), encoding="utf-8")
    logger = MetricsLogger(out, enabled=dist.is_main, total_steps=stage.max_steps, start_step=step, progress=progress)
    if dist.is_main and latest is None:
        logger.write(f"stage {stage.name!r}: {n_trainable:,} trainable parameters, {dist.world_size} process(es)")

    device = dist.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=stage.precision == "bf16")
    pad_id = processor.pad_token_id
    through = Throughput()
    window: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # source -> [CE sum, tokens] since last log
    last_loss, last_rate = float("nan"), 0.0
    t_start = time.perf_counter()
    try:
        resumed_state = state if latest is not None else {}
        nonfinite_at: list[int] = [int(n) for n in resumed_state.get("nonfinite_steps", [])]  # skipped steps
        nonfinite_run = int(resumed_state.get("nonfinite_in_a_row", 0))
        while step < stage.max_steps:
            lr = stage.optim.lr * lr_factor(step, stage.max_steps, stage.optim)
            set_lr(optimizer, lr)
            raw = [_take(stream, micro) for _ in range(stage.grad_accum)]
            batches = [_collate(samples, pad_id) for samples in raw]
            local_den = sum(float((b["loss_weight"] * trained_tokens(b["labels"]).float()).sum()) for b in batches)
            den = float(all_reduce_sum(torch.tensor([local_den], dtype=torch.float64), dist)[0])
            den = max(den, 1e-12)
            totals = torch.zeros(4, dtype=torch.float64)  # weighted CE, weighted Z^2, tokens, trained tokens
            step_window: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for j, b in enumerate(batches):
                with _no_sync(wrapped, j == len(batches) - 1), autocast:
                    out_ = wrapped(
                        input_ids=b["input_ids"].to(device),
                        attention_mask=b["attention_mask"].to(device),
                        pixel_values=b["pixel_values"].to(device) if "pixel_values" in b else None,
                    )
                wce, wz, ce_rows, counts = weighted_token_loss(out_.logits, b["labels"], b["loss_weight"])
                loss = (wce.sum() + stage.z_loss * wz.sum()) / den * dist.world_size
                loss.backward()
                totals += torch.tensor(
                    [float(wce.detach().sum()), float(wz.detach().sum()), float(b["attention_mask"].sum()), float(counts.sum())],
                    dtype=torch.float64,
                )
                for src, c, n in zip((x.get("source", "data") for x in raw[j]), ce_rows.detach().tolist(), counts.tolist()):
                    step_window[src][0] += c
                    step_window[src][1] += n
            # The decision to update rests on the loss summed over every process, so all agree.
            totals = all_reduce_sum(totals, dist)
            step_loss = float((totals[0] + stage.z_loss * totals[1]) / den)
            grad_norm = _grad_norm(params, stage.optim.clip_grad_norm) if math.isfinite(step_loss) else math.nan
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                last_loss, nonfinite_run = step_loss, 0
                for src, (c, n) in step_window.items():
                    window[src][0] += c
                    window[src][1] += n
            else:  # skip the update: no optimiser step, gradients dropped
                nonfinite_at.append(step + 1)
                nonfinite_run += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            z_mean = float(totals[1] / den)
            tokens_seen += int(totals[2])
            trained_seen += int(totals[3])
            samples_seen += stage.batch_size
            through.add(int(totals[2]))
            if step % stage.log_every == 0 or step == stage.max_steps:
                per_source = _reduce_window(window, dist)
                window.clear()
                rate = through.rate()
                record = {
                    "step": step, "loss": last_loss, "lr": lr, "tokens_per_s": rate, "grad_norm": grad_norm,
                    "z_loss": z_mean, "tokens_seen": tokens_seen, "samples_seen": samples_seen,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                }
                if not finite:  # JSON has no NaN: the loss of a skipped step is null
                    record.update(loss=None, grad_norm=None, z_loss=None, skipped=_nonfinite_what(step_loss, grad_norm))
                if per_source:
                    record["loss_by_source"] = per_source
                logger.log(record)
                last_rate = rate
            logger.step({"loss": last_loss, "tok/s": round(last_rate)})
            if not finite and dist.is_main:
                logger.write(f"step {step}: {_nonfinite_what(step_loss, grad_norm)}; the step was skipped "
                             f"({nonfinite_run} in a row, the limit is max_nonfinite_steps: {stage.max_nonfinite_steps})")
            if nonfinite_run >= stage.max_nonfinite_steps:
                raise _nonfinite_stop(stage, nonfinite_at[-nonfinite_run:], step_loss, grad_norm, out)
            ckpt.fault_point("step", step)
            if stage.checkpoint.every and step % stage.checkpoint.every == 0:
                trainer_state = {
                    "stage": stage.name, "tokens_seen": tokens_seen, "trained_tokens_seen": trained_seen,
                    "samples_seen": samples_seen, "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                    "loss": last_loss, "frozen_fingerprint": fingerprint, "config": stage.to_dict(),
                    "nonfinite_steps": nonfinite_at, "nonfinite_in_a_row": nonfinite_run,
                }
                ckpt.save_checkpoint(
                    out, step, model=inner, optimizer=optimizer, trainer_state=trainer_state,
                    data_state=stream.state_dict() if hasattr(stream, "state_dict") else {}, dist=dist,
                    keep_last=stage.checkpoint.keep_last,
                )
        final = _save_final(wrapped, processor, out, dist)
        bad = _merge_bad(gather_objects(_bad_counts(stream), dist))
        summary = {
            "stage": stage.name, "steps": step, "time_s": round(elapsed_before + time.perf_counter() - t_start, 3),
            "final_loss": last_loss if math.isfinite(last_loss) else None,  # None: every step was skipped
            "tokens_seen": tokens_seen, "trained_tokens_seen": trained_seen,
            "samples_seen": samples_seen, "trainable_parameters": n_trainable, "processes": dist.world_size,
            "bad_samples": bad.get("bad", {}), "samples_read_by_source": bad.get("seen", {}), "final_model": str(final),
            "nonfinite_steps": len(nonfinite_at), "nonfinite_at": nonfinite_at[:100],
        }
        if dist.is_main:
            write_summary(out, summary)
            logger.write(_summary_text(summary))
    finally:
        logger.close()
    return StageResult(name=stage.name, out=out, final=final, summary=summary)


def _reduce_window(window: dict[str, list[float]], dist: DistState) -> dict[str, float]:
    merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for part in gather_objects(dict(window), dist):
        for src, (c, n) in part.items():
            merged[src][0] += c
            merged[src][1] += n
    return {src: c / n for src, (c, n) in sorted(merged.items()) if n}


def _summary_text(s: dict) -> str:
    lines = [
        f"stage {s['stage']!r} done: {s['steps']} steps in {s['time_s']:.1f} s, final loss "
        f"{'none (every step was skipped)' if s['final_loss'] is None else format(s['final_loss'], '.4f')}, "
        f"{s['tokens_seen']:,} tokens seen; model in {s['final_model']}",
    ]
    bad = s.get("bad_samples") or {}
    if bad:
        lines.append("bad samples skipped: " + "; ".join(f"{src}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()) for src, reasons in bad.items()))
    if s.get("nonfinite_steps"):
        at = s.get("nonfinite_at") or []
        more = ", ..." if s["nonfinite_steps"] > len(at) else ""
        lines.append(f"steps skipped for a non-finite loss or gradient: {s['nonfinite_steps']} (at step "
                     + ", ".join(str(n) for n in at) + more + ")")
    return "\n".join(lines)


def _nonfinite_what(loss: float, grad_norm: float) -> str:
    return f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"


def _nonfinite_stop(stage: StageConfig, steps: list[int], loss: float, grad_norm: float, out: Path) -> Exception:
    """The error that ends a run after ``max_nonfinite_steps`` skipped steps in a row."""
    from ..errors import TrainingError

    latest = ckpt.list_checkpoints(out)
    resume = (f"the latest checkpoint is {latest[-1]}" if latest else "there is no checkpoint yet")
    return TrainingError(
        f"stage {stage.name!r}: {len(steps)} steps in a row had a non-finite loss or gradient (steps "
        f"{', '.join(str(n) for n in steps)}; the last: {_nonfinite_what(loss, grad_norm)}), the limit set by "
        f"max_nonfinite_steps: {stage.max_nonfinite_steps}; these steps did not change the weights. Lower optim.lr, "
        f"set optim.clip_grad_norm, use precision: fp32, or check the samples read at these steps; {resume}, "
        f"which `interleaf train CONFIG --resume` continues from (raise max_nonfinite_steps to tolerate more)"
    )


# --------------------------------------------------------------------------- recipes


def _apply_flags(recipe: Recipe, *, model: str | Path | None, data: str | Path | None, images: str | Path | None, out: str | Path | None) -> Recipe:
    from .config import ModelSpec

    if images is not None and data is None:
        raise ConfigError("--images", "is given without --data", "pass --data my.json --images my_images/")
    stages = []
    for i, s in enumerate(recipe.stages):
        if model is not None and i == 0:
            p = Path(model).expanduser()
            if not (p / "config.json").is_file():
                raise CheckpointError(f"--model {str(model)!r} is not a save_pretrained directory (no config.json)")
            s = dataclasses.replace(s, model=ModelSpec(path=str(p)))
        if data is not None:
            p = Path(data).expanduser()
            if not p.is_file():
                raise ConfigError("--data", f"{str(data)!r} is not a file", "pass a LLaVA-format JSON (a list of conversations)")
            s = dataclasses.replace(s, data=llava_mixture(p, images))
        if out is not None:
            s = dataclasses.replace(s, out=str(Path(out) if len(recipe.stages) == 1 else Path(out) / s.name))
        stages.append(s)
    return Recipe(stages, source=recipe.source)


def train(
    config: str | Path | dict | StageConfig | Recipe,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    resume: bool = False,
    model: str | Path | None = None,
    data: str | Path | None = None,
    images: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    stream_factory: StreamFactory | None = None,
    dist: DistState | None = None,
) -> list[StageResult]:
    """Run a stage or a recipe of stages (YAML path or dict), in order; returns one result per stage.

    ``overrides`` are dotted ``key=value`` strings (or a dict); ``model`` starts the first stage
    from a saved directory; ``data`` (+ ``images``) trains on a LLaVA-format JSON; ``out`` moves
    the output (a recipe's stages go to ``out/NAME``); ``resume`` continues from the latest
    checkpoints and skips stages that already finished.

    Several processes: ``dist`` (or a group already initialised) is used as it is; under ``torchrun``
    with no group yet, the call opens :func:`interleaf.distributed.distributed` for its duration
    (destroyed after success; a failure in this process ends it with a non-zero status).
    """
    recipe = _apply_flags(load_recipe(config, overrides), model=model, data=data, images=images, out=out)
    results: list[StageResult] = []
    finals: dict[str, Path] = {}
    with contextlib.nullcontext(dist) if dist is not None else distributed() as dist:
        for stage in recipe.stages:
            done = Path(stage.out) / "final"
            if resume and done.is_dir() and (Path(stage.out) / "summary.json").is_file():
                if dist.is_main:
                    print(f"stage {stage.name!r} already finished ({done}); skipping")
                finals[stage.name] = done
                results.append(StageResult(stage.name, Path(stage.out), done))
                continue
            result = train_stage(stage, resume=resume, finals=finals, stream_factory=stream_factory, progress=progress, dist=dist)
            finals[stage.name] = result.final
            results.append(result)
    return results


__all__ = ["StageResult", "prepare_model", "train", "train_stage", "weighted_token_loss"]
