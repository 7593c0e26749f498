"""Named architectures for :func:`interleaf.build`.

The registry (:mod:`.registry`) holds the :class:`Preset` record and the lookup functions and
imports no preset; :mod:`.tiny` (``tiny-random``) and :mod:`.seeds` (IDEFICS, OpenFlamingo,
InfiMM at their real sizes) import the registry and register theirs. This ``__init__`` imports
the registry first, then the two preset modules, so every name is registered once the package
is imported; no module here imports one that imports it back.
"""

from __future__ import annotations

from .registry import Preset, get_preset, presets, register
from . import tiny, seeds  # noqa: F401  (importing them registers their presets: tiny first, then the seeds)

__all__ = ["Preset", "get_preset", "presets", "register"]
