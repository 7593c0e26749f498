"""The trainer's running counts and the checkpoints that carry them.

A checkpoint (see :mod:`interleaf.training.checkpoint` for its layout) holds the weights, the
optimiser, each process's RNG and data-stream position, and the trainer state written here: the
counts of :class:`Progress`, the frozen-weights fingerprint and the stage's config. ``OUT/final`` is
a ``save_pretrained`` directory written once at the end.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..model.lora import has_adapters, save_adapted
from . import checkpoint as ckpt
from .config import StageConfig
from .distributed import DistState, barrier, unwrap
from .logging import library_bars_off_unless_terminal
from .step import StepOutcome


@dataclass
class Progress:
    """Where a stage stands: steps, what it has read, and the steps skipped for a non-finite loss."""

    step: int = 0
    tokens_seen: int = 0  # positions the LM saw (an image the model grows counts at its grown length)
    trained_seen: int = 0
    samples_seen: int = 0
    elapsed_before: float = 0.0  # seconds trained before this process resumed
    nonfinite_at: list[int] = field(default_factory=list)  # the skipped steps (1-based)
    nonfinite_run: int = 0  # skipped steps in a row, up to now
    last_loss: float = math.nan  # the loss of the last step that updated the weights in this process
    t_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def from_trainer_state(cls, state: dict) -> Progress:
        """The counts a checkpoint's trainer state holds (``last_loss`` starts again at NaN)."""
        return cls(
            step=int(state["step"]),
            tokens_seen=int(state["tokens_seen"]), trained_seen=int(state["trained_tokens_seen"]),
            samples_seen=int(state["samples_seen"]), elapsed_before=float(state["elapsed_s"]),
            nonfinite_at=[int(n) for n in state.get("nonfinite_steps", [])],
            nonfinite_run=int(state.get("nonfinite_in_a_row", 0)),
        )

    def start_clock(self) -> None:
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds trained, over every run of this stage."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def advance(self, outcome: StepOutcome, batch_size: int) -> None:
        """Count one optimiser step, updated or skipped."""
        if outcome.finite:
            self.last_loss, self.nonfinite_run = outcome.loss, 0
        else:
            self.nonfinite_at.append(self.step + 1)
            self.nonfinite_run += 1
        self.step += 1
        self.tokens_seen += outcome.tokens
        self.trained_seen += outcome.trained
        self.samples_seen += batch_size


def save_step(
    stage: StageConfig, progress: Progress, *, out: Path, model: nn.Module, optimizer, stream, fingerprint: dict,
    dist: DistState,
) -> None:
    """Write ``OUT/checkpoints/step-N`` for the step just taken (every process takes part)."""
    trainer_state = {
        "stage": stage.name, "tokens_seen": progress.tokens_seen, "trained_tokens_seen": progress.trained_seen,
        "samples_seen": progress.samples_seen, "elapsed_s": progress.elapsed(),
        "loss": progress.last_loss, "frozen_fingerprint": fingerprint, "config": stage.to_dict(),
        "nonfinite_steps": progress.nonfinite_at, "nonfinite_in_a_row": progress.nonfinite_run,
    }
    ckpt.save_checkpoint(
        out, progress.step, model=model, optimizer=optimizer, trainer_state=trainer_state,
        data_state=stream.state_dict() if hasattr(stream, "state_dict") else {}, dist=dist,
        keep_last=stage.checkpoint.keep_last,
    )


def save_final(model: nn.Module, processor, out: Path, dist: DistState) -> Path:
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
        with library_bars_off_unless_terminal():  # a log file gets no bar fragments
            if state is not None and has_adapters(inner):
                save_adapted(inner, processor, tmp, state)
            elif state is not None:
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


__all__ = ["Progress", "save_final", "save_step"]
