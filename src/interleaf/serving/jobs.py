"""What the server hands the batching worker: a :class:`Job`, its :class:`Sampling`, and the errors
:meth:`~interleaf.serving.batcher.Batcher.submit` raises.

A job's answers come back as events passed to its ``sink`` (called from the worker thread):

- ``("delta", choice_index, text)``: more text of choice ``choice_index``; for a job that asked for
  ``logprobs``, ``("delta", choice_index, text, entries)`` with the OpenAI log-probability entries of
  the tokens that make that text (:mod:`~interleaf.serving.logprobs`);
- ``("finish", choice_index, finish_reason, completion_tokens)``: that choice is complete;
- ``("error", exception)``: the job failed (no more events follow).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The request queue is full; try again later."""


class ServerClosed(RuntimeError):
    """The batcher is shutting down."""


class TooLarge(ValueError):
    """A request the server can never run as asked (more choices than its batch, caches over its budget);
    ``param`` names the request field to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class WorkerUnavailable(RuntimeError):
    """The worker thread is not running (never started, or died) or is stuck: new work would hang."""


@dataclass(frozen=True)
class Sampling:
    """How a job's tokens are chosen. ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


Event = tuple  # see the module docstring


@dataclass
class Job:
    """One request, ready for the model.

    ``pixel_values`` holds the request's images in reading order: one view each, ``(N_img, 3, S, S)``,
    or for a model that tiles images at any resolution (LLaVA-NeXT, xGen-MM instruct) each image's
    views, base first, zero-padded on the view axis, ``(N_img, V, 3, S, S)``, with ``image_sizes``
    ``(N_img, 2)`` in the order the model's processor writes them. None without images.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # the request's images: (N_img, 3, S, S), or (N_img, V, 3, S, S) with sizes
    max_new_tokens: int
    sink: Callable[[Event], None]
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    image_sizes: torch.Tensor | None = None  # (N_img, 2) for any-resolution models, as the processor gives them
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, with its k most likely alternatives
    lm_length: int | None = None  # the prompt's positions in the model (images grown, xGen-MM); None: len(input_ids)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the sink; a sink that fails (its client is gone) cancels the job."""
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 (never let one request's sink stop the worker)
            log.debug("dropping an event for a job whose sink failed", exc_info=True)
            self.cancel()
