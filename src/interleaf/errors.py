"""Errors a user can act on.

Every error raised on user input derives from :class:`InterleafError` and says what is wrong,
where (the field, file, batch row or prompt item), and how to fix it.
"""

from __future__ import annotations


class InterleafError(Exception):
    """Base class for every error interleaf raises on bad input."""


class ConfigError(InterleafError, ValueError):
    """A configuration value is invalid. The message names the field (dotted path)."""

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        msg = f"config field '{field}': {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class InputError(InterleafError, ValueError):
    """A prompt, image or request is invalid. The message names the offending item."""


class CheckpointError(InterleafError, ValueError):
    """A checkpoint directory or file cannot be used. The message lists what is missing."""


class TrainingError(InterleafError, RuntimeError):
    """A training run cannot go on (e.g. the loss stayed non-finite). The message says how to resume."""


class OfflineError(InterleafError, RuntimeError):
    """Something would need the network, which interleaf never uses unless asked."""
