"""Training checkpoints: atomic, pruned, and enough to resume a run exactly.

A checkpoint is a folder ``OUT/checkpoints/step-00000500/``::

    trainable.safetensors   the trainable parameters (full tensors, by the model's parameter names)
    optimizer.pt            AdamW's state (full tensors, by parameter name); read with weights_only=True
    rng_rank{r}.json        Python, NumPy and torch RNG states of process r
    data_rank{r}.json       process r's data-stream position and bad-sample counts
    trainer_state.json      step, counters, the stage config, the frozen-weights fingerprint
    manifest.json           the size and sha256 of every other file (written last)

Only trainable parameters are stored: the frozen ones are rebuilt identically at resume from the
stage's start (a preset built with the stage's seed, or the same saved directory), which keeps a
checkpoint of a frozen 7B LM to the size of its adapters. A fingerprint (count and float64 sums)
of the frozen weights is stored and checked, so a changed base model is an error, not a silent
drift.

Writes are atomic: everything goes into ``.tmp-step-N`` in the same folder, which is renamed to
``step-N`` only once complete (``os.replace``). A process killed mid-write leaves a ``.tmp-*``
folder, which :func:`list_checkpoints` ignores and the next save removes. A write that fails
(a full disk, an I/O error) removes its ``.tmp-*`` folder and raises a :class:`CheckpointError`
saying that the previous checkpoint is intact and how to resume; nothing older is pruned until a
new checkpoint is complete.

At resume, :func:`latest_checkpoint` checks the newest checkpoint against its manifest (sizes,
then sha256) and falls back to the one before, naming the bad one and why; with none left it
raises. ``checkpoint.keep_last`` (default 2) is how many complete checkpoints stay on disk: keep
at least 2 so that a damaged newest one has a predecessor to fall back to.

Fault injection (for tests): the environment variable ``INTERLEAF_FAULT=ACTION:POINT=STEP`` makes
the process act when it reaches ``POINT`` at optimiser step ``STEP``. ``ACTION`` is ``kill``
(SIGKILL itself, like ``kill -9``) or ``enospc`` (raise ``OSError(ENOSPC)``, like a full disk);
``POINT`` is ``step`` (right after that step's optimiser update) or ``checkpoint.PHASE`` inside
the checkpoint write, ``PHASE`` being one of :data:`CHECKPOINT_PHASES` (each names what is about to
happen): e.g. ``kill:step=7``, ``kill:checkpoint.rename=4``, ``enospc:checkpoint.optimizer=6``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..files import read_json
from ..fingerprint import file_digest
from .distributed import DistState, all_reduce_sum, barrier

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
REQUIRED = ("trainable.safetensors", "optimizer.pt", "trainer_state.json", MANIFEST)
# Points inside save_checkpoint, in order; each names what is about to happen.
CHECKPOINT_PHASES = ("rank_files", "weights", "optimizer", "trainer_state", "manifest", "rename", "prune", "done")
FAULT_ENV = "INTERLEAF_FAULT"
_FAULT_ACTIONS = ("kill", "enospc")


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


def _step_dirs(out: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` folder, complete or not, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def _main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest checkpoint that matches its manifest, or ``None`` when there is no checkpoint.

    A damaged newer one (a missing, truncated or altered file) is skipped with a warning naming it
    and why; when checkpoints exist but none is intact this raises a :class:`CheckpointError`.
    """
    found = _step_dirs(out)
    bad: list[str] = []
    for _, path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            if bad and _main_process():
                print(f"warning: resuming from {path} instead of the newer damaged one: {'; '.join(bad)}",
                      file=sys.stderr, flush=True)
            return path
        bad.append(f"{path} is unusable ({problem})")
    if bad:
        raise CheckpointError(
            f"no intact checkpoint to resume from: {'; '.join(bad)}. Restore a copy of one of them, or start "
            f"afresh by removing {checkpoint_root(out)} (or by training into another --out without --resume)"
        )
    return None


# --------------------------------------------------------------------------- integrity


def _write_manifest(folder: Path, step: int) -> None:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            size, digest = file_digest(p, sync=True)
            files[p.name] = {"size": size, "sha256": digest}
    _write_json(folder / MANIFEST, {"format": 1, "step": step, "files": files})


# Checkpoints this process has checked in full, with the size and mtime of each file then: a resume
# hashes them once, and any later change to a file makes them checked again.
_VERIFIED: dict[str, tuple] = {}


def _signature(p: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file()))


def verify_checkpoint(path: str | Path) -> str | None:
    """``None`` when every file of the checkpoint matches its manifest, else what is wrong (one line)."""
    p = Path(path)
    manifest_path = p / MANIFEST
    if not manifest_path.is_file():
        return f"it has no {MANIFEST}, so it was not written completely by this version of interleaf"
    try:
        manifest = read_json(manifest_path, MANIFEST, error=CheckpointError)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except CheckpointError as e:  # unreadable, not UTF-8, not JSON: the message names the file
        return str(e)
    except (KeyError, TypeError) as e:
        return f"{MANIFEST} cannot be read ({e})"
    unlisted = [n for n in REQUIRED if n != MANIFEST and n not in files]
    if unlisted:
        return f"{MANIFEST} does not list {', '.join(unlisted)}"
    for name, entry in sorted(files.items()):
        f = p / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes where the manifest says {entry.get('size')} (truncated or overwritten)"
    for name, entry in sorted(files.items()):
        try:
            _, digest = file_digest(p / name)
        except OSError as e:
            return f"{name} cannot be read ({e})"
        if digest != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (its content is corrupted)"
    _VERIFIED[str(p.resolve())] = _signature(p)
    return None


# --------------------------------------------------------------------------- fault injection (tests)


def _parse_fault(spec: str) -> tuple[str, str, int]:
    points = ("step", *(f"checkpoint.{p}" for p in CHECKPOINT_PHASES))
    action, _, rest = spec.partition(":")
    point, _, at = rest.partition("=")
    if action not in _FAULT_ACTIONS or point not in points or not at.strip().isdigit():
        raise ConfigError(
            FAULT_ENV, f"cannot read {spec!r}",
            f"write ACTION:POINT=STEP with ACTION one of {list(_FAULT_ACTIONS)} and POINT one of {list(points)}, "
            "e.g. kill:step=7 or enospc:checkpoint.optimizer=4; unset it for a normal run",
        )
    return action, point, int(at)


def fault_point(point: str, step: int, file: str | Path | None = None) -> None:
    """Act on ``INTERLEAF_FAULT`` if it names this point and step (does nothing when it is unset)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, where, at = _parse_fault(spec)
    if where != point or at != step:
        return
    if action == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if file is None else str(file))


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
    """Write ``OUT/checkpoints/step-N`` atomically (collective: every process calls it).

    A write that fails on any process (``OSError``: a full disk, a lost mount) removes the
    unfinished folder and raises a :class:`CheckpointError` on every process; the checkpoints
    already on disk are untouched.
    """
    root = checkpoint_root(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    previous = [p for n, p in _step_dirs(out) if n < step]
    failure: OSError | None = None
    if dist.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            failure = e
    barrier(dist)
    if failure is None and tmp.is_dir():
        try:
            fault_point("checkpoint.rank_files", step, tmp / f"rng_rank{dist.rank}.json")
            _write_json(tmp / f"rng_rank{dist.rank}.json", rng_state())
            _write_json(tmp / f"data_rank{dist.rank}.json", data_state)
        except OSError as e:
            failure = e
    weights = trainable_state(model)  # collectives under FSDP: every process takes part, failed or not
    optim = optimizer_state(model, optimizer)
    if dist.is_main and failure is None:
        try:
            fault_point("checkpoint.weights", step, tmp / "trainable.safetensors")
            save_file(weights, str(tmp / "trainable.safetensors"))
            fault_point("checkpoint.optimizer", step, tmp / "optimizer.pt")
            torch.save(optim, tmp / "optimizer.pt")
            fault_point("checkpoint.trainer_state", step, tmp / "trainer_state.json")
            _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": dist.world_size})
        except OSError as e:
            failure = e
    del weights, optim
    _agree_or_fail(failure, dist, step, tmp, previous)  # every process's files are in place (or it raises)
    if dist.is_main:
        try:
            fault_point("checkpoint.manifest", step, tmp / MANIFEST)
            _write_manifest(tmp, step)
            fault_point("checkpoint.rename", step, final)
            if final.exists():  # a damaged checkpoint of this step, passed over at resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            failure = e
    _agree_or_fail(failure, dist, step, tmp, previous)
    if dist.is_main:
        fault_point("checkpoint.prune", step)
        if keep_last is not None:
            # Only older ones are pruned, and only now that this one is complete; a damaged newer one
            # left by an earlier run is replaced when the run reaches its step.
            older = [p for n, p in _step_dirs(out) if n < step]
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        fault_point("checkpoint.done", step)
    barrier(dist)
    return final


def _agree_or_fail(failure: OSError | None, dist: DistState, step: int, tmp: Path, previous: list[Path]) -> None:
    """Every process learns whether any write failed; if one did, clean up and raise everywhere."""
    failed = all_reduce_sum(torch.tensor([0.0 if failure is None else 1.0]), dist)
    if float(failed[0]) == 0:
        return
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(dist)
    what = f"{failure}" if failure is not None else "another process failed to write its part"
    intact = [p for p in previous if verify_checkpoint(p) is None] if dist.is_main else previous
    if intact:
        kept = (f"the previous checkpoint {intact[-1]} (step {int(_STEP_DIR.match(intact[-1].name).group(1))}) "
                f"is intact, and `interleaf train CONFIG --resume` continues from it")
    else:
        kept = "there is no earlier checkpoint, so `interleaf train CONFIG --resume` starts again from step 0"
    raise CheckpointError(
        f"could not write the checkpoint of step {step} into {tmp} (process {dist.rank}): {what}. The unfinished "
        f"folder was removed and {kept}. Free disk space in {tmp.parent} (or lower checkpoint.keep_last) and resume"
    )


def read_trainer_state(path: str | Path) -> dict:
    p = Path(path)
    missing = [n for n in REQUIRED if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(p)!r} is incomplete: it lacks {', '.join(missing)}")
    return read_json(p / "trainer_state.json", f"checkpoint {str(p)!r}", error=CheckpointError)


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, dist: DistState, fingerprint: dict | None
) -> tuple[dict, dict]:
    """Restore weights, optimizer and this process's RNG; returns ``(trainer_state, data_state)``."""
    p = Path(path)
    state = read_trainer_state(p)
    if _VERIFIED.get(str(p.resolve())) != _signature(p):
        problem = verify_checkpoint(p)
        if problem is not None:
            raise CheckpointError(f"checkpoint {str(p)!r} is damaged: {problem}; resume from an earlier checkpoint")
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
    set_rng_state(read_json(p / f"rng_rank{dist.rank}.json", f"checkpoint {str(p)!r}", error=CheckpointError))
    data_state = read_json(p / f"data_rank{dist.rank}.json", f"checkpoint {str(p)!r}", error=CheckpointError)
    return state, data_state


__all__ = [
    "CHECKPOINT_PHASES", "checkpoint_root", "fault_point", "frozen_fingerprint", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "read_trainer_state", "save_checkpoint", "verify_checkpoint",
]
