"""The training loop: build the stage's model, stream its mixture, optimise, checkpoint, log.

:func:`train_stage` runs one stage from its parts: the setup (:mod:`.prepare`), one optimiser step
(:mod:`.step`), the running counts and checkpoints (:mod:`.progress`) and the log (:mod:`.report`);
:func:`train` runs a recipe's stages in order.

The loss of one optimiser step, over its whole global batch (every micro-batch of every process),
with per-sample loss weights ``w_i`` (the source's ``loss_weight``), trained positions ``T_i``
(labels != -100 after the shift), per-token cross-entropy ``CE_it`` and log-partition ``Z_it``::

    L = ( sum_i w_i sum_{t in T_i} CE_it  +  z_loss * sum_i w_i sum_{t in T_i} Z_it^2 )
        / sum_i w_i |T_i|

With every ``w_i = 1`` this is the model's own loss (the mean over trained tokens). (A DPO stage,
``objective: dpo``, trains on preference pairs with the loss of :mod:`interleaf.training.dpo`.) The
denominator is summed over processes before the backward pass, and each process's loss is
multiplied by the number of processes because DDP and FSDP average gradients: the gradient is
then exactly that of ``L``, whatever the split into processes and accumulation steps.

``batch_size`` is the global batch (samples per optimiser step); each process takes
``batch_size / (processes * grad_accum)`` samples per micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import distributed
from ..errors import CheckpointError, ConfigError
from . import checkpoint as ckpt
from .config import Recipe, StageConfig, llava_mixture, load_recipe
from .distributed import DistState, current_state
from .logging import MetricsLogger
from .optim import lr_factor, set_lr
from .prepare import StreamFactory, default_stream, restore, set_up
from .progress import save_final, save_step
from .report import StageReport, nonfinite_stop
from .dpo import dpo_step
from .step import optimizer_step


@dataclass
class StageResult:
    name: str
    out: Path
    final: Path
    summary: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    trainee = set_up(stage, finals or {}, stream_factory or default_stream, dist)
    counts = restore(stage, trainee, latest, resume, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(stage.to_dict(), sort_keys=False), encoding="utf-8")
    logger = MetricsLogger(out, enabled=dist.is_main, total_steps=stage.max_steps, start_step=counts.step, progress=progress)
    if dist.is_main and latest is None:
        logger.write(f"stage {stage.name!r}: {trainee.n_trainable:,} trainable parameters, {dist.world_size} process(es)")
    report = StageReport(stage, logger, dist, flops=trainee.flops if stage.objective == "lm" else None)
    pad_id = trainee.processor.pad_token_id
    counts.start_clock()
    try:
        while counts.step < stage.max_steps:
            lr = stage.optim.lr * lr_factor(counts.step, stage.max_steps, stage.optim)
            set_lr(trainee.optimizer, lr)
            if stage.objective == "dpo":
                outcome = dpo_step(stage, trainee, dist)
            else:
                outcome = optimizer_step(
                    stage, trainee.wrapped, trainee.optimizer, trainee.params, trainee.stream, trainee.micro, pad_id, dist
                )
            counts.advance(outcome, stage.batch_size)
            report.after_step(lr, outcome, counts)
            if counts.nonfinite_run >= stage.max_nonfinite_steps:
                raise nonfinite_stop(stage, counts, outcome)
            ckpt.fault_point("step", counts.step)
            if stage.checkpoint.every and counts.step % stage.checkpoint.every == 0:
                save_step(
                    stage, counts, out=out, model=trainee.inner, optimizer=trainee.optimizer, stream=trainee.stream,
                    fingerprint=trainee.fingerprint, dist=dist,
                )
        final = save_final(trainee.wrapped, trainee.processor, out, dist)
        summary = report.finish(counts, stream=trainee.stream, final=final, n_trainable=trainee.n_trainable)
    finally:
        logger.close()
    return StageResult(name=stage.name, out=out, final=final, summary=summary)


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
            s = dataclasses.replace(s, data=llava_mixture(p, images, "preference" if s.objective == "dpo" else "llava"))
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
    from a saved directory; ``data`` (+ ``images``) trains on a LLaVA-format JSON (a DPO stage: a
    preference JSON, see :mod:`interleaf.data.preference`); ``out`` moves
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


__all__ = ["StageResult", "seed_everything", "train", "train_stage"]
