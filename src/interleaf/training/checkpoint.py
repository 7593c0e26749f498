"""Training checkpoints: atomic, pruned, and enough to resume a run exactly.

A checkpoint is a folder ``OUT/checkpoints/step-00000500/``::

    trainable.safetensors   the trainable parameters (full tensors, by the model's parameter names)
    optimizer.pt            AdamW's state (full tensors, by parameter name); read with weights_only=True
    rng_rank{r}.json        Python, NumPy and torch RNG states of process r
    data_rank{r}.json       process r's data-stream position and bad-sample counts
    trainer_state.json      step, counters, the stage config, the frozen-weights fingerprint (written last)

Only trainable parameters are stored: the frozen ones are rebuilt identically at resume from the
stage's start (a preset built with the stage's seed, or the same saved directory), which keeps a
checkpoint of a frozen 7B LM to the size of its adapters. A fingerprint (count and float64 sums)
of the frozen weights is stored and checked, so a changed base model is an error, not a silent
drift.

Writes are atomic: everything goes into ``.tmp-step-N`` in the same folder, which is renamed to
``step-N`` only once complete (``os.replace``). A process killed mid-write leaves a ``.tmp-*``
folder, which :func:`list_checkpoints` ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .distributed import DistState, barrier

_STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED = ("trainable.safetensors", "optimizer.pt", "trainer_state.json")


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``OUT/checkpoints``, oldest first (temporary folders ignored)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / n).is_file() for n in REQUIRED):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


# --------------------------------------------------------------------------- state pieces


def frozen_fingerprint(model: nn.Module) -> dict:
    """Count and float64 sums of the frozen parameters (checked at resume)."""
    total, total_abs, count = 0.0, 0.0, 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                t = p.detach().double()
                total += float(t.sum())
                total_abs += float(t.abs().sum())
                count += p.numel()
    return {"count": count, "sum": total, "abs_sum": total_abs}


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (collective under FSDP: every rank calls it)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):  # an FSDP2 shard (DTensor)
            t = t.full_tensor()
        out[name] = t.cpu().clone().contiguous()
    return out


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where} does not match the model's trainable parameters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; resume with the stage's own freeze policy and model"
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in state:
                continue
            full = state[name]
            if hasattr(p, "device_mesh"):  # FSDP2: keep this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements).to_local()
                p.to_local().copy_(full)
            else:
                if tuple(full.shape) != tuple(p.shape):
                    raise CheckpointError(f"checkpoint {where}: {name} has shape {tuple(full.shape)}, the model {tuple(p.shape)}")
                p.copy_(full.to(p.device, p.dtype))


def _optim_options(full: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, full tensors (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_optim_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    out: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    data_state: dict,
    dist: DistState,
    keep_last: int | None = None,
) -> Path:
    """Write ``OUT/checkpoints/step-N`` atomically (collective: every process calls it)."""
    root = checkpoint_root(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(dist)
    _write_json(tmp / f"rng_rank{dist.rank}.json", rng_state())
    _write_json(tmp / f"data_rank{dist.rank}.json", data_state)
    weights = trainable_state(model)
    optim = optimizer_state(model, optimizer)
    if dist.is_main:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": dist.world_size})
    barrier(dist)
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last is not None:
            for old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
    return final


def read_trainer_state(path: str | Path) -> dict:
    p = Path(path)
    missing = [n for n in REQUIRED if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: it lacks {', '.join(missing)}")
    try:
        return json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(p)!r}: trainer_state.json is not valid JSON ({e})") from e


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, dist: DistState, fingerprint: dict | None
) -> tuple[dict, dict]:
    """Restore weights, optimizer and this process's RNG; returns ``(trainer_state, data_state)``."""
    p = Path(path)
    state = read_trainer_state(p)
    if state.get("world_size") != dist.world_size:
        raise CheckpointError(
            f"checkpoint {str(p)!r} was written by {state.get('world_size')} processes but this run has "
            f"{dist.world_size}; each process's data position is saved, so resume with "
            f"--nproc_per_node {state.get('world_size')}"
        )
    saved_fp = state.get("frozen_fingerprint")
    if fingerprint is not None and saved_fp is not None:
        same = saved_fp["count"] == fingerprint["count"] and all(
            abs(saved_fp[k] - fingerprint[k]) <= 1e-9 * max(1.0, abs(saved_fp[k])) for k in ("sum", "abs_sum")
        )
        if not same:
            raise CheckpointError(
                f"checkpoint {str(p)!r} was trained on other frozen weights than this stage builds "
                f"({saved_fp} vs {fingerprint}); resume with the same model, seed and freeze policy"
            )
    for name in (f"rng_rank{dist.rank}.json", f"data_rank{dist.rank}.json"):
        if not (p / name).is_file():
            raise CheckpointError(f"checkpoint {str(p)!r} lacks {name}")
    load_trainable_state(model, load_file(str(p / "trainable.safetensors")), str(p))
    load_optimizer_state(model, optimizer, torch.load(p / "optimizer.pt", weights_only=True, map_location="cpu"))
    set_rng_state(json.loads((p / f"rng_rank{dist.rank}.json").read_text(encoding="utf-8")))
    data_state = json.loads((p / f"data_rank{dist.rank}.json").read_text(encoding="utf-8"))
    return state, data_state


__all__ = [
    "checkpoint_root", "frozen_fingerprint", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
    "read_trainer_state", "save_checkpoint",
]
