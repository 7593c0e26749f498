"""A cohort: rows generated together over several rounds, with their own caches.

A job with ``n`` choices has ``n`` :class:`Row` s. :func:`group_rows` puts rows that may share a
``generate`` call together (see :mod:`interleaf.serving.batcher`); each group becomes a
:class:`Cohort`, one left-padded batch whose images are encoded once::

    prompts (R rows, lengths T_r) ──► left-padded input_ids, attention_mask (R, T)
    pixels (N_r, 3, S, S) per row ──► zero-padded (R, N_max, 3, S, S) ──► model.prepare_media
    or, any resolution, views (N_r, V_r, 3, S, S) and sizes (N_r, 2) per row
      ──► every row's images in reading order (K, V_max, 3, S, S), sizes (K, 2) ──► model.prepare_media
      ──► media cache (either family's per-call image state, with ``.select(rows)``)
    each round: model.generate(input_ids, attention_mask, media cache, KV cache) ──► (R, T + new)

Between rounds the cohort keeps its KV cache, its media cache and (when seeded) its own random
state; finished rows are dropped from all of them (:meth:`Cohort.keep`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..generation import split_at_stop
from .jobs import Job, Sampling
from .logprobs import LogprobRecorder


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


def group_rows(jobs: list[Job]) -> list[list[Row]]:
    """The jobs' rows, grouped by what may run in one ``generate`` call: all greedy rows together,
    sampled rows by temperature and top_p, and a seeded job alone (so that its seed reproduces it)."""
    groups: dict[tuple, list[Row]] = {}
    for job in jobs:
        s = job.sampling
        if s.greedy:
            key: tuple = ("greedy",)
        elif s.seed is not None:
            key = ("seeded", id(job))
        else:
            key = ("sample", s.temperature, s.top_p)
        groups.setdefault(key, []).extend(Row(job, i) for i in range(job.n))
    return list(groups.values())


class RowStreamer(BaseStreamer):
    """Receives each decoding step's tokens (B,) for the whole cohort; skips the prompt."""

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids (B, T)
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class RowsDone(StoppingCriteria):
    """Tells ``generate`` which rows of the cohort are finished (by our own rules); all of them at shutdown."""

    def __init__(self, rows: list[Row], stopping: Callable[[], bool]):
        self.rows = rows
        self.stopping = stopping

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.stopping()
        return torch.tensor([stop or r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


def batch_images(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The rows' images in a layout ``model.prepare_media`` takes: ``(pixels, image_sizes)``, or None
    when no row has an image. A job with ``n`` choices gives its images to each of its rows.

    - One view per image: pixels ``(R, N_max, 3, S, S)``, row r's images first, then zeros; no sizes.
    - Any resolution (the jobs carry ``image_sizes``): pixels ``(K, V_max, 3, S, S)``, the K images
      of all rows in reading order (row by row), each image's views zero-padded to the most any
      image of the cohort has, and ``image_sizes`` ``(K, 2)``: the layout LLaVA-NeXT and xGen-MM's
      any-resolution path both read, whatever mix of image counts and sizes the rows hold.
    """
    given = [(r.job.pixel_values, r.job.image_sizes) for r in rows]
    held = [(p, s) for p, s in given if p is not None and p.shape[0]]
    if not held:
        return None
    tiled = [s is not None for _, s in held]
    if any(tiled) != all(tiled):
        raise ValueError("a cohort mixes images with and without image_sizes; one model's processor gives one layout")
    if not all(tiled):  # (R, N_max, 3, S, S): each row's images, zero-padded on the image axis
        empty = held[0][0][:0]
        per_row = [p if p is not None else empty for p, _ in given]
        return pad_sequence(per_row, batch_first=True).to(torch.float32), None
    images = [image for p, _ in held for image in p]  # each (V, 3, S, S), the job's own padding kept
    batch = pad_sequence(images, batch_first=True).to(torch.float32)  # (K, V_max, 3, S, S)
    return batch, torch.cat([torch.as_tensor(s).reshape(-1, 2) for _, s in held])  # (K, 2)


class Cohort:
    """Rows generated together, with their caches, over several rounds."""

    def __init__(self, rows: list[Row], sampling: Sampling, model, pad_id: int):
        self.rows = rows
        self.sampling = sampling
        device = model.device
        prompts = [r.job.input_ids for r in rows]
        width = max(len(p) for p in prompts)
        self.input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, T)
        self.attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
        for i, p in enumerate(prompts):
            self.input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.attention_mask[i, width - len(p):] = 1
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        self.media = None
        images = batch_images(rows)
        if images is not None:
            pixels, sizes = images
            extra = {} if sizes is None else {"image_sizes": sizes}
            with torch.no_grad():
                self.media = model.prepare_media(self.input_ids, pixels.to(device), self.attention_mask, **extra)
        self.cache = DynamicCache()
        self.device = torch.device(device)
        # keeps each step's log-probabilities when a row asked for them (see interleaf.serving.logprobs)
        self.recorder = LogprobRecorder() if any(r.entries is not None for r in rows) else None
        self.rng_state: tuple | None = None  # a seeded cohort's own random state, kept between rounds
        if sampling.seed is not None and not sampling.greedy:
            with torch.random.fork_rng(devices=_rng_devices(self.device)):
                torch.manual_seed(sampling.seed)
                self.rng_state = _capture_rng(self.device)

    def generate(self, model, kwargs: dict, streamer: BaseStreamer, stopping) -> None:
        """One round: ``model.generate(**kwargs)`` continued from the cohort's caches (and its own random
        state when seeded); the batch then holds the new tokens too."""
        with torch.random.fork_rng(devices=_rng_devices(self.device), enabled=self.rng_state is not None):
            if self.rng_state is not None:
                _restore_rng(self.rng_state, self.device)
            out = model.generate(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                media_cache=self.media,
                past_key_values=self.cache,
                streamer=streamer,
                stopping_criteria=stopping,
                **kwargs,
            )
            if self.rng_state is not None:
                self.rng_state = _capture_rng(self.device)
        new = out.shape[1] - self.input_ids.shape[1]
        ones = self.attention_mask.new_ones((out.shape[0], new))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)  # (R, T + new)
        self.input_ids = out

    def keep(self, indices: list[int]) -> None:
        """Drop every row not in ``indices`` from the batch and its caches."""
        index = torch.tensor(indices, dtype=torch.long, device=self.input_ids.device)
        self.rows = [self.rows[i] for i in indices]
        self.input_ids = self.input_ids[index]
        self.attention_mask = self.attention_mask[index]
        self.cache.batch_select_indices(index)
        if self.media is not None:
            self.media = self.media.select(index)

    @property
    def jobs(self) -> list[Job]:
        """The jobs with a row still running (each once)."""
        return list({id(r.job): r.job for r in self.rows if not r.done}.values())


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _capture_rng(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_rng(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
