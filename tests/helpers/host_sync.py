"""Finding host synchronisations without a GPU: every tensor operation that makes the host wait for
a value computed on the device (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, boolean
indexing, ...) is recorded, with the innermost interleaf source line that asked for it.

On a CPU these calls cost nothing, but on a GPU each one stalls the stream; a decode step or a
training micro-batch that makes none of them can run ahead of the device::

    with HostSyncs() as syncs:
        model(**inputs)
    assert not syncs.in_interleaf(), syncs.report()
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import interleaf

PACKAGE = str(Path(interleaf.__file__).parent)
TORCH = str(Path(torch.__file__).parent)

# Operations whose result the host must read (or whose output size depends on device values).
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
           "masked_select", "unique", "unique_consecutive", "numpy", "cpu", "any_nonzero"}


def _is_boolean_index(args) -> bool:
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in index)


class HostSyncs(TorchFunctionMode):
    """Records syncing tensor operations made while active: ``calls`` holds ``(name, where)``, where
    ``where`` is the innermost ``file:line`` outside torch that asked for it (interleaf's code, or a
    library it calls: transformers' own per-step synchronisations are not ours to remove)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, bool]] = []  # (operation, where, in interleaf)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING or (name in ("__getitem__", "__setitem__") and _is_boolean_index(args)):
            if not self.skip(sys._getframe(1)):
                self.calls.append((name, *_caller()))
        return func(*args, **(kwargs or {}))

    def skip(self, frame) -> bool:
        """Whether to leave out an operation asked for from ``frame`` (and its callers): a subclass
        leaves out what it does not measure (work on host tensors, say); nothing here."""
        return False

    def in_interleaf(self) -> list[tuple[str, str]]:
        """The syncing operations interleaf's own code asked for: ``(operation, file:line (function))``."""
        return [(n, w) for n, w, ours in self.calls if ours]

    def report(self) -> str:
        return "\n".join(f"{n} at {w}" for n, w, _ in self.calls) or "none"


def _caller() -> tuple[str, bool]:
    """The innermost ``file:line (function)`` outside torch that asked for the operation, and whether it is
    interleaf's."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return "unknown", False
    path = frame.f_code.co_filename
    if path.startswith(PACKAGE):
        return f"interleaf/{path[len(PACKAGE) + 1:]}:{frame.f_lineno} ({frame.f_code.co_name})", True
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})", False
