"""Dynamic batching: many requests, one model, one worker thread.

Design (continuous batching by *cohorts*, generated in short rounds):

- Request handlers turn a request into a :class:`Job` (token ids and image pixels, already
  validated) and :meth:`Batcher.submit` it to a bounded queue; a full queue raises
  :class:`QueueFull` at once (the server answers 429).
- One worker thread owns the model. Each turn of its loop it first *admits* waiting jobs: when
  nothing is running it waits for a first job and then at most ``batch_wait_s`` for more; when
  something is running it takes whatever is waiting without waiting. It admits jobs while their
  rows (``n`` each) fit in ``max_batch_size`` rows in flight, and groups them by sampling
  settings (all greedy jobs together; sampled jobs by temperature and top_p; a job with a
  ``seed`` alone, so that its seed reproduces its answer) into new *cohorts*: one left-padded
  batch each, whose images are encoded once (:meth:`~interleaf.model.InterleafForConditionalGeneration.prepare_media`).
- Then every cohort runs one *round*: ``model.generate`` for at most ``round_tokens`` new tokens,
  continuing from the cohort's own KV cache (``past_key_values``) and media cache. A cohort is
  never merged with another (so no KV cache is ever re-aligned), and a newly arrived request
  waits at most one round of each running cohort before its own prefill: a long answer never
  makes a short one wait for it to finish.
- A :class:`transformers.generation.streamers.BaseStreamer` receives each step's tokens for the
  whole cohort and hands each row's new text to its job (a request with ``n > 1`` has ``n``
  rows). A row finishes on an end token, a stop string (cut from the answer, as OpenAI does),
  its own ``max_new_tokens``, or when its client went away; a stopping criterion tells
  ``generate`` which rows are done, and finished rows are dropped from the cohort (and from its
  caches) after the round.

Greedy rows get what ``model.generate`` gives the same prompt alone: left padding and a cache
continued over rounds compute the same logits as one call (the tests hold this token for token
under concurrent load; in half precision on a GPU, as with any batched inference, the batch shape
can change the last bits of a logit). The price of never merging cohorts is throughput: requests
that arrive at different moments run as separate ``generate`` calls, interleaved round by round.
Seeded sampling keeps its own random state per cohort, so a ``seed`` reproduces an answer.

Failure is contained by design:

- An exception while preparing or running a cohort (a model error, a bad tensor, a bug in the
  bookkeeping) fails the requests of that cohort only: each gets an ``("error", exc)`` event (the
  server answers HTTP 500), the traceback is logged, the cohort and its caches are dropped, and the
  worker carries on with the others.
- If the worker thread ends anyway, it fails every request it holds on its way out; from then on
  :meth:`Batcher.health` reports it dead and :meth:`Batcher.submit` raises
  :class:`WorkerUnavailable` at once instead of queueing work nobody will do. A worker that has
  had work but made no progress (no decoding step) for ``stall_timeout_s`` is reported stuck the
  same way, until it makes progress again.
- :meth:`Batcher.shutdown` refuses new work and asks the worker to stop: a running ``generate``
  ends at its next decoding step, and every queued or running request gets
  :class:`ServerClosed`. :meth:`Batcher.stop` then waits for the worker until a deadline and
  logs (and returns ``False``) when it could not.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..generation import generation_kwargs

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The request queue is full; try again later."""


class ServerClosed(RuntimeError):
    """The batcher is shutting down."""


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


# Events sent to a job's sink (called from the worker thread):
#   ("delta", choice_index, text)
#   ("finish", choice_index, finish_reason, completion_tokens)
#   ("error", exception)
Event = tuple


@dataclass
class Job:
    """One request, ready for the model."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (N_img, 3, S, S) or None
    max_new_tokens: int
    sink: Callable[[Event], None]
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the sink; a sink that fails (its client is gone) cancels the job."""
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 (never let one request's sink stop the worker)
            log.debug("dropping an event for a job whose sink failed", exc_info=True)
            self.cancel()


class _Row:
    """One generated sequence: a job's choice ``index``."""

    def __init__(self, job: Job, index: int):
        self.job = job
        self.index = index
        self.tokens: list[int] = []
        self.sent = ""  # text already handed to the job
        self.done = False


class _RowStreamer(BaseStreamer):
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


class _RowsDone(StoppingCriteria):
    """Tells ``generate`` which rows of the cohort are finished (by our own rules); all of them at shutdown."""

    def __init__(self, rows: list[_Row], stopping: Callable[[], bool]):
        self.rows = rows
        self.stopping = stopping

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.stopping()
        return torch.tensor([stop or r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


class _Cohort:
    """Rows generated together, with their caches, over several rounds."""

    def __init__(self, rows: list[_Row], sampling: Sampling, model, pad_id: int):
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
        pixels = [r.job.pixel_values for r in rows]
        n_max = max((p.shape[0] for p in pixels if p is not None), default=0)
        if n_max:
            shape = next(p for p in pixels if p is not None).shape[1:]
            batch = torch.zeros((len(rows), n_max, *shape), dtype=torch.float32)  # (R, N_max, 3, S, S)
            for i, p in enumerate(pixels):
                if p is not None:
                    batch[i, : p.shape[0]] = p
            with torch.no_grad():
                self.media = model.prepare_media(self.input_ids, batch.to(device))
        self.cache = DynamicCache()
        self.device = torch.device(device)
        self.rng_state: tuple | None = None  # a seeded cohort's own random state, kept between rounds
        if sampling.seed is not None and not sampling.greedy:
            with torch.random.fork_rng(devices=_rng_devices(self.device)):
                torch.manual_seed(sampling.seed)
                self.rng_state = _capture_rng(self.device)

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


class Batcher:
    """A bounded queue of :class:`Job` and the worker thread that generates them in batches."""

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        round_tokens: int = 8,
        batch_wait_s: float = 0.005,
        stall_timeout_s: float = 120.0,
        tokenizer_lock: threading.Lock | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or round_tokens < 1:
            raise ValueError("max_batch_size, max_queue and round_tokens must be at least 1")
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.round_tokens = round_tokens
        self.batch_wait_s = batch_wait_s
        self.stall_timeout_s = stall_timeout_s
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        base = generation_kwargs(processor, max_new_tokens=1)
        self.pad_id: int = base["pad_token_id"]
        self.eos_ids: set[int] = set(base.get("eos_token_id", []))
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[_Cohort] = []
        self._stopping = False
        self._deadline: float | None = None  # when shutdown must be over
        self._thread: threading.Thread | None = None
        self._working = False  # the worker holds work (admitting or running cohorts)
        self._beat = time.monotonic()  # the worker's last sign of progress
        self.death: str | None = None  # why the worker ended unexpectedly
        # Called with the cohort's jobs before each round (tests use it to make a round fail or stall).
        self.round_hook: Callable[[list[Job]], None] | None = None
        self.batches_run = 0  # rounds run, for tests and metrics
        self.rounds_failed = 0
        self.max_rows_seen = 0
        self.rows_cancelled = 0  # rows dropped because their client went away

    # -- public --
    def start(self) -> "Batcher":
        with self._cond:
            if self._thread is None and not self._stopping:
                self._beat = time.monotonic()
                self._thread = threading.Thread(target=self._run, name="interleaf-batcher", daemon=True)
                self._thread.start()
        return self

    def health(self) -> tuple[bool, str]:
        """(ok, why not): the worker is running and, if it holds work, made progress recently."""
        if self._stopping:
            return False, "the server is shutting down"
        if self._thread is None:
            return False, "the batching worker has not been started"
        if not self._thread.is_alive():
            return False, f"the batching worker stopped unexpectedly ({self.death or 'unknown cause'})"
        idle = time.monotonic() - self._beat
        if self._working and idle > self.stall_timeout_s:
            return False, f"the batching worker made no progress for {idle:.0f} s (stall timeout {self.stall_timeout_s:g} s)"
        return True, "ok"

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new work, cancel queued and running work; the worker must be gone ``timeout`` s from now."""
        with self._cond:
            if self._deadline is None:
                self._deadline = time.monotonic() + timeout
            self._stopping = True
            self._cond.notify_all()
            worker_alive = self._thread is not None and self._thread.is_alive()
            orphans = [] if worker_alive else list(self._pending)
            if not worker_alive:
                self._pending.clear()
        for job in orphans:  # nobody else will answer them
            job.emit(("error", ServerClosed("the server is shutting down")))

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for the worker thread to end; True when it is not running."""
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
        return thread is None or not thread.is_alive()

    def abandon(self) -> int:
        """Answer every request still held with :class:`ServerClosed`, for a worker that does not stop
        in time (its model call goes on, but nobody waits for it); returns how many were answered."""
        jobs = self.jobs
        with self._cond:
            self._pending.clear()
        for job in jobs:
            job.emit(("error", ServerClosed("the server is shutting down")))
            job.cancel()
        return len(jobs)

    def stop(self, timeout: float = 10.0) -> bool:
        """Shut down and wait for the worker (until the shutdown deadline); False, logged, if it is still running."""
        self.shutdown(timeout)
        if self._thread is None:
            return True
        if not self.wait((self._deadline or 0.0) - time.monotonic()):
            self.abandon()
            log.error("the batching worker did not stop within the shutdown timeout (a model call is still running "
                      "for %d row(s)); exiting without it", self.active_rows)
            return False
        return True

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` jobs are already waiting,
        :class:`ServerClosed` during shutdown and :class:`WorkerUnavailable` when no healthy worker would run it."""
        if job.n > self.max_batch_size:
            raise ValueError(f"n={job.n} is more than the server's max batch size {self.max_batch_size}")
        with self._cond:
            if self._stopping:
                raise ServerClosed("the server is shutting down")
            ok, why = self.health()
            if not ok:
                raise WorkerUnavailable(why)
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            self._pending.append(job)
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:  # consistent with the worker's bookkeeping of what it takes from the queue
            return len(self._pending)

    @property
    def active_rows(self) -> int:
        return sum(len(c.rows) for c in self._active)

    @property
    def jobs(self) -> list[Job]:
        """Every job held: queued, or with rows in the running batches (a snapshot)."""
        with self._cond:
            queued = list(self._pending)
        return queued + [job for cohort in list(self._active) for job in cohort.jobs]

    # -- the worker --
    def _run(self) -> None:
        """The worker thread: the loop, and on any way out, an answer for every request still held."""
        error: BaseException = ServerClosed("the server is shutting down")
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 (a bug in the loop itself: report it to everyone waiting)
            log.exception("the batching worker stopped unexpectedly")
            self.death = f"{type(e).__name__}: {e}"
            error = WorkerUnavailable(f"the batching worker stopped unexpectedly ({self.death})")
        finally:
            with self._cond:
                jobs = list(self._pending)
                self._pending.clear()
            for cohort in self._active:
                jobs += cohort.jobs
            self._active = []
            self._working = False
            for job in jobs:
                job.emit(("error", error))

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._active:
                    self._working = False
                    while not self._pending and not self._stopping:
                        self._cond.wait()
                    deadline = time.monotonic() + self.batch_wait_s
                    while not self._stopping and sum(j.n for j in self._pending) < self.max_batch_size:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                if self._stopping:
                    return
                jobs = self._take()
                self._working = True
                self._beat = time.monotonic()
            self._admit(jobs)
            if not self._run_rounds():
                return

    def _run_rounds(self) -> bool:
        """One round of every running cohort; False when shutdown began. (A method of its own, so
        that no local variable keeps a finished cohort's caches alive while the worker waits.)"""
        for cohort in list(self._active):
            if self._stopping:
                return False
            self._round(cohort)
        return True

    def _take(self) -> list[Job]:
        free = self.max_batch_size - self.active_rows
        jobs = []
        while self._pending and self._pending[0].n <= free:
            job = self._pending.popleft()
            if job.cancelled.is_set():
                self.rows_cancelled += job.n
                continue
            jobs.append(job)
            free -= job.n
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[_Row]] = {}
        for job in jobs:
            s = job.sampling
            if s.greedy:
                key: tuple = ("greedy",)
            elif s.seed is not None:
                key = ("seeded", id(job))
            else:
                key = ("sample", s.temperature, s.top_p)
            groups.setdefault(key, []).extend(_Row(job, i) for i in range(job.n))
        for rows in groups.values():
            try:
                self._active.append(_Cohort(rows, rows[0].job.sampling, self.model, self.pad_id))
            except Exception as e:  # noqa: BLE001 (reported to the requests, the worker goes on)
                log.exception("preparing a batch of %d row(s) failed", len(rows))
                self._fail(rows, e)
            self._beat = time.monotonic()

    def _fail(self, rows: list[_Row], error: BaseException) -> None:
        for job in {id(r.job): r.job for r in rows}.values():
            job.emit(("error", error))

    def _round(self, cohort: _Cohort) -> None:
        """One round of ``cohort``; any exception fails its requests only and drops it with its caches."""
        try:
            self._run_round(cohort)
        except Exception as e:  # noqa: BLE001 (one cohort's failure must not stop the others)
            log.exception("a generation round of %d row(s) failed; failing their requests", len(cohort.rows))
            self.rounds_failed += 1
            self._fail([r for r in cohort.rows if not r.done], e)
            for row in cohort.rows:
                row.done = True
            self._active.remove(cohort)

    def _run_round(self, cohort: _Cohort) -> None:
        if self.round_hook is not None:
            self.round_hook(cohort.jobs)
        alive = [r for r in cohort.rows if not r.done]
        steps = min(self.round_tokens, max(r.job.max_new_tokens - len(r.tokens) for r in alive))
        s = cohort.sampling
        kwargs = generation_kwargs(self.processor, max_new_tokens=steps, temperature=s.temperature, top_p=s.top_p)
        streamer = _RowStreamer(lambda tokens: self._step(cohort.rows, tokens))
        self.max_rows_seen = max(self.max_rows_seen, len(cohort.rows))
        with torch.random.fork_rng(devices=_rng_devices(cohort.device), enabled=cohort.rng_state is not None):
            if cohort.rng_state is not None:
                _restore_rng(cohort.rng_state, cohort.device)
            out = self.model.generate(
                input_ids=cohort.input_ids,
                attention_mask=cohort.attention_mask,
                media_cache=cohort.media,
                past_key_values=cohort.cache,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_RowsDone(cohort.rows, lambda: self._stopping)]),
                **kwargs,
            )
            if cohort.rng_state is not None:
                cohort.rng_state = _capture_rng(cohort.device)
        self.batches_run += 1
        new = out.shape[1] - cohort.input_ids.shape[1]
        ones = cohort.attention_mask.new_ones((out.shape[0], new))
        cohort.attention_mask = torch.cat([cohort.attention_mask, ones], dim=1)  # (R, T + new)
        cohort.input_ids = out
        if self._stopping:
            return  # the worker's way out answers the rows still running
        for row in cohort.rows:  # rows a round left without reaching a rule (cannot happen, but be safe)
            if not row.done and len(row.tokens) >= row.job.max_new_tokens:
                self._finish(row, "length")
        keep = [i for i, r in enumerate(cohort.rows) if not r.done]
        if not keep:
            self._active.remove(cohort)
        elif len(keep) < len(cohort.rows):
            cohort.keep(keep)

    # -- per-token bookkeeping --
    def _step(self, rows: list[_Row], tokens: list[int]) -> None:
        self._beat = time.monotonic()
        for row, token in zip(rows, tokens):
            if row.done:
                continue
            if row.job.cancelled.is_set():
                row.done = True
                self.rows_cancelled += 1
                continue
            row.tokens.append(token)
            if token in self.eos_ids:
                self._flush(row, final=True)
                self._finish(row, "stop")
                continue
            if self._flush(row, final=False):
                self._finish(row, "stop")
            elif len(row.tokens) >= row.job.max_new_tokens:
                self._flush(row, final=True)
                self._finish(row, "length")

    def _flush(self, row: _Row, final: bool) -> bool:
        """Send the row's new text; True when a stop string ended it."""
        with self.tokenizer_lock:
            text = self.processor.decode(row.tokens, skip_special_tokens=True)
        stopped = False
        held = 0
        for stop in row.job.stop:
            at = text.find(stop)
            if at >= 0:
                text, stopped = text[:at], True
        if not stopped and not final:
            while held < len(text) and text[len(text) - held - 1] == "\ufffd":
                held += 1  # an unfinished multi-byte character: wait for its other bytes
            for stop in row.job.stop:  # a stop string may be starting: hold it back
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        held = max(held, k)
                        break
        ready = text[: len(text) - held]
        if ready.startswith(row.sent) and len(ready) > len(row.sent):
            row.job.emit(("delta", row.index, ready[len(row.sent):]))
            row.sent = ready
        return stopped

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        row.job.emit(("finish", row.index, reason, len(row.tokens)))
