"""One generated sequence of a request: a :class:`Row` (a job with ``n`` choices has ``n``), and how its
text reaches the job as it grows (stop strings, unfinished characters, log-probabilities)."""

from __future__ import annotations

from typing import Callable

import torch

from ..generation import split_at_stop
from .jobs import Job


class Row:
    """One generated sequence: a job's choice ``index``."""

    def __init__(self, job: Job, index: int):
        self.job = job
        self.index = index
        self.tokens: list[int] = []
        self.sent = ""  # text already handed to the job
        self.done = False
        # the log-probability entry of each token but an end token, when the job asked for them
        self.entries: list[dict] | None = [] if job.logprobs is not None else None
        self.reported = 0  # entries already handed to the job
        self.generator: torch.Generator | None = None  # a seeded job's own generator, shared by its rows

    def send(self, text: str, final: bool, covering: Callable[[str], int] | None = None) -> bool:
        """Hand the job what is new in ``text`` (this row's tokens so far, decoded); True when a stop
        string ended it. Text that may still become a stop string, or an unfinished multi-byte
        character, waits for the next tokens unless ``final``.

        A row with log-probability :attr:`entries` sends with its text the entries of the tokens that
        make it: ``covering(text)`` is how many of the row's tokens it takes to decode to ``text``
        (and maybe more); all of them when ``final`` without a stop string (a stop string's own tokens are left out).
        """
        ready, stopped = split_at_stop(text, self.job.stop, final)
        if not stopped and not final:
            ready = ready[: len(text) - _unfinished_chars(text)]
        grew = ready.startswith(self.sent) and len(ready) > len(self.sent)
        if self.entries is None:
            if grew:
                self.job.emit(("delta", self.index, ready[len(self.sent):]))
                self.sent = ready
            return stopped
        whole = final and not stopped
        upto = len(self.entries) if whole or covering is None else covering(ready if grew else self.sent)
        new = self.entries[self.reported:upto]
        if grew or new:
            self.job.emit(("delta", self.index, ready[len(self.sent):] if grew else "", new))
            self.sent = ready if grew else self.sent
            self.reported = max(self.reported, upto)
        return stopped

    def finish(self, reason: str) -> None:
        self.done = True
        self.job.emit(("finish", self.index, reason, len(self.tokens)))


def _unfinished_chars(text: str) -> int:
    """How many replacement characters end ``text``: bytes of a character whose other bytes are still to come."""
    return len(text) - len(text.rstrip("\ufffd"))
