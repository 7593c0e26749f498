"""Whether output goes to a person at a terminal: progress bars are drawn there, and anywhere else (a
log file, a pipe) plain lines are written instead, since every redraw of a bar would become a
fragment of the log."""

from __future__ import annotations

from typing import Any


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (where a redrawn progress bar belongs)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
