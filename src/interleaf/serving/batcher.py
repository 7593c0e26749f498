"""Dynamic batching: many requests, one model, one worker thread.

Design (continuous batching by *cohorts*, generated in short rounds; the jobs and their errors
are in :mod:`~interleaf.serving.jobs`, a cohort and its rows in :mod:`~interleaf.serving.cohort`,
this module holds the queue, the worker thread and its health):

- Request handlers turn a request into a :class:`Job` (token ids and image pixels, already
  validated) and :meth:`Batcher.submit` it to a bounded queue; a full queue raises
  :class:`QueueFull` at once (the server answers 429).
- One worker thread owns the model. Each turn of its loop it first *admits* waiting jobs: when
  nothing is running it waits for a first job and then at most ``batch_wait_s`` for more; when
  something is running it takes whatever is waiting without waiting. It admits jobs while their
  rows (``n`` each) fit in ``max_batch_size`` rows in flight, and groups them by sampling
  settings (all greedy jobs together; sampled jobs by temperature and top_p; a job with a
  ``seed`` alone, so that its seed reproduces its answer) into new *cohorts*: one left-padded
  batch each, whose images are encoded once (:meth:`~interleaf.model.InterleafForConditionalGeneration.prepare_media`:
  the per-call image state of either fusion family, a cross-attention media cache or a
  token-insertion model's image embeddings; the batcher only passes it to ``generate`` and
  selects its rows).
- Then every cohort runs one *round*: ``model.generate`` for at most ``round_tokens`` new tokens,
  continuing from the cohort's own KV cache (``past_key_values``) and image state. A cohort is
  never merged with another (so no KV cache is ever re-aligned), and a newly arrived request
  waits at most one round of each running cohort before its own prefill: a long answer never
  makes a short one wait for it to finish.
- A :class:`transformers.generation.streamers.BaseStreamer` receives each step's tokens for the
  whole cohort and hands each row's new text to its job (a request with ``n > 1`` has ``n``
  rows). A row finishes on an end token, a stop string (cut from the answer at its earliest
  occurrence, as OpenAI does: :func:`~interleaf.generation.split_at_stop`), its own
  ``max_new_tokens``, or when its client went away; a stopping criterion tells ``generate`` which
  rows are done, and finished rows are dropped from the cohort (and from its caches) after the round.

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
from typing import Callable

from transformers import StoppingCriteriaList

from ..generation import generation_kwargs
from .cohort import Cohort, Row, RowsDone, RowStreamer, group_rows
from .jobs import Job, QueueFull, ServerClosed, WorkerUnavailable
from .logprobs import LogprobRecorder, TokenTexts, entry, logprob_kwargs

log = logging.getLogger(__name__)


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
        self.token_texts = TokenTexts(processor.tokenizer)  # each token's text and bytes, for logprobs
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Cohort] = []
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
        for rows in group_rows(jobs):
            try:
                self._active.append(Cohort(rows, rows[0].job.sampling, self.model, self.pad_id))
            except Exception as e:  # noqa: BLE001 (reported to the requests, the worker goes on)
                log.exception("preparing a batch of %d row(s) failed", len(rows))
                self._fail(rows, e)
            self._beat = time.monotonic()

    def _fail(self, rows: list[Row], error: BaseException) -> None:
        for job in {id(r.job): r.job for r in rows}.values():
            job.emit(("error", error))

    def _round(self, cohort: Cohort) -> None:
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

    def _run_round(self, cohort: Cohort) -> None:
        if self.round_hook is not None:
            self.round_hook(cohort.jobs)
        alive = [r for r in cohort.rows if not r.done]
        steps = min(self.round_tokens, max(r.job.max_new_tokens - len(r.tokens) for r in alive))
        s = cohort.sampling
        kwargs = generation_kwargs(self.processor, max_new_tokens=steps, temperature=s.temperature, top_p=s.top_p)
        if cohort.recorder is not None:
            kwargs = logprob_kwargs(kwargs, cohort.recorder, s)
        streamer = RowStreamer(lambda tokens: self._step(cohort.rows, tokens, cohort.recorder))
        self.max_rows_seen = max(self.max_rows_seen, len(cohort.rows))
        stopping = StoppingCriteriaList([RowsDone(cohort.rows, lambda: self._stopping)])
        cohort.generate(self.model, kwargs, streamer, stopping)
        self.batches_run += 1
        if self._stopping:
            return  # the worker's way out answers the rows still running
        for row in cohort.rows:  # rows a round left without reaching a rule (cannot happen, but be safe)
            if not row.done and len(row.tokens) >= row.job.max_new_tokens:
                row.finish("length")
        keep = [i for i, r in enumerate(cohort.rows) if not r.done]
        if not keep:
            self._active.remove(cohort)
        elif len(keep) < len(cohort.rows):
            cohort.keep(keep)

    # -- per-token bookkeeping --
    def _step(self, rows: list[Row], tokens: list[int], recorder: LogprobRecorder | None = None) -> None:
        self._beat = time.monotonic()
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.done:
                continue
            if row.job.cancelled.is_set():
                row.done = True
                self.rows_cancelled += 1
                continue
            row.tokens.append(token)
            if row.entries is not None and recorder is not None and token not in self.eos_ids:
                with self.tokenizer_lock:
                    row.entries.append(entry(recorder.latest[i], token, row.job.logprobs or 0, self.token_texts))
            if token in self.eos_ids:
                self._flush(row, final=True)
                row.finish("stop")
                continue
            if self._flush(row, final=False):
                row.finish("stop")
            elif len(row.tokens) >= row.job.max_new_tokens:
                self._flush(row, final=True)
                row.finish("length")

    def _flush(self, row: Row, final: bool) -> bool:
        """Send the row's new text (with its tokens' log-probabilities when asked); True when a stop string ended it."""
        with self.tokenizer_lock:
            text = self.processor.decode(row.tokens, skip_special_tokens=True)
            if row.entries is not None:
                return row.send(text, final, lambda sent: self._covering(row, sent))
        return row.send(text, final)

    def _covering(self, row: Row, text: str) -> int:
        """The fewest of ``row``'s tokens (at least those already reported) that decode to ``text`` and maybe more."""
        k = row.reported
        while k < len(row.entries or ()):
            if self.processor.decode(row.tokens[:k], skip_special_tokens=True).startswith(text):
                break
            k += 1
        return k
