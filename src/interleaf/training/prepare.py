"""Setting a stage up: its model (built, loaded or taken from an earlier stage), freezing, the
wrapped model and optimiser, this process's data stream, a DPO stage's reference, and the state a
resume restores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model.lora import has_adapters, merge_lora
from ..model.modeling import freeze_overwritten_token_rows, freeze_unused_vision_parameters
from . import checkpoint as ckpt
from .config import StageConfig
from .distributed import DistState, materialise_from_main, unwrap, wrap_model
from .flops import FlopCount, flop_count
from .lora import apply_lora
from .optim import build_optimizer
from .progress import Progress

StreamFactory = Callable[[StageConfig, Any, int, int], Iterable[dict]]


@dataclass
class Trainee:
    """What a stage trains, and with what."""

    model: nn.Module  # the model as built (on this process's device)
    wrapped: nn.Module  # under DDP or FSDP2 when there are several processes
    inner: nn.Module  # ``wrapped`` unwrapped
    processor: Any
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # every parameter the optimiser updates
    stream: Any  # this process's share of the stage's data
    micro: int  # samples per micro-batch on this process
    fingerprint: dict  # of the frozen weights, checked at resume
    n_trainable: int
    reference: Any = None  # a DPO stage's reference (interleaf.training.dpo), made from the starting model
    flops: FlopCount | None = None  # the model's weights as the step FLOPs count them (interleaf.training.flops)


def _build_model(stage: StageConfig, finals: dict[str, Path], on_meta: bool = False):
    from ..api import build, load

    spec = stage.model
    if spec.from_stage is not None:
        if spec.from_stage not in finals:
            raise ConfigError("model.from_stage", f"stage {spec.from_stage!r} has not run in this recipe")
        model, processor = load(finals[spec.from_stage])
    elif spec.path is not None:
        model, processor = load(spec.path)
    else:
        model, processor = build(spec.preset, seed=stage.seed, **({"device": "meta"} if on_meta else {}), **spec.options)
    if has_adapters(model):  # a directory with LoRA adapters: this stage starts from the merged model
        merge_lora(model)
    # what one image becomes in the LM's row follows the model (a processor saved before the field existed
    # lacks it), so that max_length and the token counts measure that row
    processor.tokens.image_lm_length = model.config.tokens_cfg.image_lm_length
    return model, processor


def _random_weights(stage: StageConfig) -> bool:
    """The stage builds its model with random weights: from a preset or build options that name no
    directory to load (``lm:``, ``vision:``) and no device."""
    spec = stage.model
    loads = any(isinstance(spec.options.get(k), (str, Path)) for k in ("lm", "vision"))
    return spec.path is None and spec.from_stage is None and not loads and "device" not in spec.options


# A freeze policy and its counterpart in the other fusion family: what connects the image to the LM
# trains (flamingo / projector), or that and the whole LM (unfreeze_lm / projector_lm). A recipe
# written for either family (sft_llava, dpo) names one and means the same for both.
FREEZE_COUNTERPARTS = {"flamingo": "projector", "unfreeze_lm": "projector_lm", "projector": "flamingo",
                       "projector_lm": "unfreeze_lm"}


def stage_freeze(stage: StageConfig, model: nn.Module) -> str | None:
    """The freeze policy the stage gives ``model``: its own, or its counterpart in the model's family
    (:data:`FREEZE_COUNTERPARTS`); None keeps the model's. A policy with no counterpart there
    (``flamingo_train_vision`` for a token-insertion model) is a :class:`ConfigError`."""
    from ..config import freeze_policies

    policy, fusion = stage.freeze, model.config.fusion
    if policy is None or policy in freeze_policies(fusion):
        return policy
    counterpart = FREEZE_COUNTERPARTS.get(policy)
    if counterpart in freeze_policies(fusion):
        return counterpart
    raise ConfigError(
        "freeze", f"{policy!r} is not a freeze policy of the {fusion!r} family and has no counterpart in it",
        f"use one of {list(freeze_policies(fusion))}",
    )


def prepare_model(model: nn.Module, stage: StageConfig, device: torch.device | None = None) -> int:
    """Apply the stage's freezing (:func:`stage_freeze`), LoRA adapters (:mod:`.lora`, on ``device``'s
    kind of machine: default the model's), z-loss and gradient checkpointing; returns the trainable count."""
    model.config.z_loss = float(stage.z_loss)
    policy = stage_freeze(stage, model)
    if policy is not None:
        model.config.freeze = policy
    model.apply_freeze(policy)
    freeze_unused_vision_parameters(model)  # what never gets a gradient does not train, whatever the policy
    freeze_overwritten_token_rows(model)
    if stage.lora is not None:
        apply_lora(model, stage.lora, device if device is not None else next(model.parameters()).device)
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


def set_up(stage: StageConfig, finals: dict[str, Path], stream_factory: StreamFactory, dist: DistState) -> Trainee:
    """Build the stage's model, optimiser and stream, in the order that keeps runs reproducible.

    The caller seeds the RNGs first: building the model draws from them. A DPO stage's reference
    is made here from the starting model, before it is wrapped and before a checkpoint is restored.
    """
    from .dpo import build_reference, check_stage_data

    check_stage_data(stage)
    # several processes, random weights: only the main process draws them (the others build on the
    # meta device and receive them)
    from_main = dist.enabled and _random_weights(stage)
    model, processor = _build_model(stage, finals, on_meta=from_main and not dist.is_main)
    n_trainable = prepare_model(model, stage, dist.device)
    fingerprint = ckpt.frozen_fingerprint(model) if dist.is_main or not from_main else None
    flops = flop_count(model)  # before FSDP2 shards the weights
    if from_main:
        fingerprint = materialise_from_main(model, dist, fingerprint)
    elif next(model.parameters()).device != dist.device:
        model.to(dist.device)
    reference = None
    if stage.objective == "dpo":
        reference = build_reference(stage, model, processor, dist, stage.batch_size // (stage.grad_accum * dist.world_size))
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
    stream = stream_factory(stage, processor, dist.rank, dist.world_size)
    return Trainee(
        model, wrapped, inner, processor, optimizer, params, stream, micro, fingerprint, n_trainable, reference, flops
    )


def restore(stage: StageConfig, trainee: Trainee, latest: Path | None, resume: bool, dist: DistState) -> Progress:
    """The progress to start from: the checkpoint ``latest`` restored into ``trainee``, or step 0."""
    if latest is None:
        if resume and dist.is_main:
            print(f"--resume: no checkpoint in {Path(stage.out) / 'checkpoints'}; starting from step 0")
        return Progress()
    state, data_state = ckpt.load_checkpoint(
        latest, model=trainee.inner, optimizer=trainee.optimizer, dist=dist, fingerprint=trainee.fingerprint
    )
    trainee.stream.load_state_dict(data_state)
    progress = Progress.from_trainer_state(state)
    changed = sorted(k for k, v in stage.to_dict().items() if state.get("config", {}).get(k) != v and k != "max_steps")
    if dist.is_main:
        print(f"resuming from {latest} at step {progress.step}", flush=True)
        if changed:
            print(f"warning: settings changed since the checkpoint: {', '.join(changed)}", flush=True)
    return progress


__all__ = [
    "FREEZE_COUNTERPARTS", "StreamFactory", "Trainee", "default_stream", "prepare_model", "restore", "set_up",
    "stage_freeze",
]
