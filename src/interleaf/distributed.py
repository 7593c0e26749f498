"""The process group's one owner: ``with distributed() as state:`` for training and evaluation alike.

``torchrun --nproc_per_node N ...`` starts N processes and gives each ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The lifecycle of the ``torch.distributed``
group they share lives here and nowhere else::

    with distributed() as state:        # WORLD_SIZE > 1: init_process_group (gloo on CPU, nccl on GPU)
        ...work...                       # state.rank, state.world_size, state.device
                                         # success: barrier, then destroy_process_group
                                         # an exception in this rank: no collective at all; the error is
                                         # printed with the rank and the process ends at once with a
                                         # non-zero status, so torchrun stops the other ranks instead of
                                         # leaving them waiting in a barrier

- **One process** (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): the context does nothing; exceptions
  propagate as usual.
- **A group already exists** (an outer ``distributed()``, or the caller's own ``init_process_group``):
  the context uses it and leaves its teardown, and the handling of errors, to whoever created it.
- **Library functions never create a group themselves.** ``train_stage`` and the evaluation runner
  read the state with :func:`current_state`, which raises :class:`DistributedError` when
  ``WORLD_SIZE > 1`` but no group is initialised.
- **Who opens the context.** The CLI verbs ``interleaf train`` and ``interleaf eval`` open it around
  the whole verb. The public Python entry points ``interleaf.training.train`` and
  ``interleaf.evaluation.evaluate`` (so also ``evaluate_synthetic``) open it too, for the duration
  of the call: ``torchrun --nproc_per_node 2 my_script.py`` calling ``train(...)`` works as it is,
  and each call creates and destroys its own group. A script that makes several calls, or runs
  collectives of its own between them, wraps them in one ``with distributed():`` so that they share
  one group. Under ``torchrun`` (and only there) a failing call therefore ends the process with a
  non-zero status instead of raising: another rank could otherwise wait for it forever.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from .errors import InterleafError

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_generation = 0  # process groups this process has created (their keys in the launcher's store differ)


class DistributedError(InterleafError, RuntimeError):
    """The process group is missing or cannot be set up from the environment."""


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun, which sets it"
        ) from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def current_state() -> DistState:
    """This process's place in an existing group, or the one-process state. Never creates a group.

    Raises :class:`DistributedError` when ``WORLD_SIZE > 1`` but no process group is initialised.
    """
    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistState(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                         device=_device(local))
    world = env_world_size()
    if world > 1:
        raise DistributedError(
            f"WORLD_SIZE={world} but no torch.distributed process group is initialised; wrap the calls in "
            "`with interleaf.distributed.distributed():`, or call interleaf.training.train / "
            "interleaf.evaluation.evaluate, or run `torchrun ... -m interleaf train|eval`, which open it"
        )
    return DistState(device=_device(local))


def _init() -> DistState:
    missing = [v for v in _LAUNCH_VARS if not os.environ.get(v)]
    if missing:
        world = env_world_size()
        raise DistributedError(
            f"WORLD_SIZE={world} asks for {world} processes but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
            f"`torchrun --standalone --nproc_per_node {world} ...` (or unset WORLD_SIZE for one process)"
        )
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _device(local)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s); start at most "
                "that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = default_pg_nccl_timeout if backend == "nccl" else default_pg_timeout
    # torch names every default group "0" in the store; torchrun's store outlives a group, so a second
    # group in the same run would meet the first one's keys (and could wait for peers that are gone).
    # Each group of this process gets its own key prefix; every rank opens its groups in the same order.
    global _generation
    _generation += 1
    store, rank, world = next(dist.rendezvous("env://", rank, env_world_size(), timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(f"interleaf/{_generation}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistState(rank=rank, world_size=dist.get_world_size(), local_rank=local, device=device)


def _fail(state: DistState, error: BaseException) -> NoReturn:
    """End this rank now, without any collective: print the error with the rank, flush, exit non-zero."""
    where = f"rank {state.rank} of {state.world_size}"
    try:
        if isinstance(error, InterleafError):
            print(f"error ({where}): {error}", file=sys.stderr)
        else:
            print(f"error ({where}): {type(error).__name__}: {error}", file=sys.stderr)
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(2 if isinstance(error, InterleafError) else 1)


def _finish(state: DistState) -> None:
    """After success in every rank: wait for the others, then destroy the group."""
    try:
        barrier(state)
        dist.destroy_process_group()
    except BaseException as e:  # a peer died during the barrier: fail without further collectives
        _fail(state, e)


@contextlib.contextmanager
def distributed() -> Iterator[DistState]:
    """Own the process group for the ``with`` block; see the module docstring for the rules."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current_state()
        return
    state = _init()
    try:
        yield state
    except SystemExit as e:
        if e.code not in (0, None):
            _fail(state, e)
        _finish(state)
        raise
    except BaseException as e:
        _fail(state, e)
    _finish(state)


def end_launched_process(state: DistState) -> None:
    """After a CLI verb succeeded in every process of a ``torchrun`` launch (its group already destroyed):
    end this process now with status 0, output flushed, without the interpreter's teardown.

    Objects that still refer to the destroyed group's C++ state (FSDP2's device meshes, DTensor's
    functional collectives) are otherwise finalised while the interpreter tears itself down, and
    gloo's worker threads can then abort the process ("terminate called without an active
    exception") after all the work was done and saved, which torchrun reports as a failure. Only the
    CLI calls this, as the last thing a verb does; library functions never end the caller's process.
    One process (no launch): nothing happens.
    """
    if not state.enabled:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- collectives


def barrier(state: DistState) -> None:
    if state.enabled:
        if state.device.type == "cuda":
            dist.barrier(device_ids=[state.device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """Sum over processes (in place on a copy); the identity with one process."""
    if not state.enabled:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj, state: DistState) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` with one process."""
    if not state.enabled:
        return [obj]
    out: list = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


__all__ = [
    "DistState",
    "DistributedError",
    "all_reduce_sum",
    "barrier",
    "current_state",
    "distributed",
    "env_world_size",
    "gather_objects",
]
