"""Training-test helpers: a stream that turns chosen steps' losses into NaN; a recipe run under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from interleaf.training.loop import default_stream


class NaNImages:
    """The real stream, with every image of the batches of chosen steps replaced by NaNs (the
    forward pass then gives a NaN loss). Steps are counted from the stream's position, so a resumed
    run sees the same ones."""

    def __init__(self, stream, steps: set[int], per_step: int):
        self.stream, self.steps, self.per_step = stream, steps, per_step
        self.bad = stream.bad

    def take(self, n: int) -> list[dict]:
        step = self.stream.samples_seen // self.per_step + 1
        samples = self.stream.take(n)
        if step in self.steps:
            for s in samples:
                s["images"] = [torch.full_like(img, float("nan")) for img in s["images"]]
        return samples

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def nan_at(steps: dict[int, list[int]] | list[int]):
    """A stream factory: NaN images at ``steps`` (a list: on every process; a dict: per rank)."""

    def factory(stage, processor, rank, world_size):
        mine = steps.get(rank, []) if isinstance(steps, dict) else steps
        return NaNImages(default_stream(stage, processor, rank, world_size), set(mine), stage.batch_size // world_size)

    return factory


def train_with_torchrun(config: Path, processes: int = 2) -> None:
    """``interleaf train CONFIG`` in ``processes`` processes under torchrun (one thread each); fails with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "interleaf", "train", str(config), "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
