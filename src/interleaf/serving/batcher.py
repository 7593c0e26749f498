"""Continuous batching: many requests, one model, one worker thread, one running batch.

Design (the jobs and their errors are in :mod:`~interleaf.serving.jobs`, a row's text in
:mod:`~interleaf.serving.rows`, the running batch and its caches in :mod:`~interleaf.serving.running`,
the choice of each row's token in :mod:`~interleaf.serving.sampling`; this module holds the queue,
the worker thread and its health):

- Request handlers turn a request into a :class:`Job` (token ids and image pixels, already
  validated) and :meth:`Batcher.submit` it to a bounded queue; a full queue raises
  :class:`QueueFull` at once (the server answers 429).
- One worker thread owns the model and repeats: *admit*, then *one decoding step*. When nothing
  runs it waits for a first job and then at most ``batch_wait_s`` for more; otherwise it takes
  whatever is waiting without waiting. It admits jobs in arrival order while their rows (``n``
  each) fit in ``max_batch_size`` rows in flight and their caches in ``max_cache_bytes`` (the KV
  cache of the padded batch at every row's longest length, plus the cross-attention media caches;
  see :meth:`Batcher.cache_need`), and while their prompts stay within ``max_prefill_tokens``
  (at least one job each time), so that a burst of long prompts is prefilled over several turns
  with decoding steps between them and running streams keep flowing.
- The newcomers are *prefilled* as one left-padded batch with their images (either family), their
  first tokens chosen and sent, and they *join* the running batch: caches left-padded to one width
  and concatenated, nobody's prefix recomputed (:class:`~interleaf.serving.running.RunningBatch`).
- Each decoding step feeds every row's last token, chooses each row's next token by its own
  settings (greedy, temperature, top_p; a seeded job from its own generator) and hands each row's
  new text to its job (a request with ``n > 1`` has ``n`` rows). A row finishes on an end token, a
  stop string (cut from the answer at its earliest occurrence, as OpenAI does:
  :func:`~interleaf.generation.split_at_stop`), its own ``max_new_tokens``, or when its client
  went away, and leaves the batch (and its caches) at once. A request therefore joins the running
  batch at the next step and leaves it when done, whatever the others are doing.

Greedy rows get what ``model.generate`` gives the same prompt alone: left padding and masked
positions compute the same logits (the tests hold this token for token for requests that join
and leave at random steps; in half precision on a GPU, as with any batched inference, the batch
shape can change the last bits of a logit). A seeded job reproduces its answer whatever runs
beside it. The one host synchronisation per step is reading the chosen tokens, which the
streams need.

Failure is contained by design:

- An exception while prefilling newcomers (a bad image, a model error) fails those requests only;
  an exception in a decoding step fails the rows of the running batch (they share its caches) and
  drops it. Each failed request gets an ``("error", exc)`` event (the server answers HTTP 500), the
  traceback is logged, and the worker carries on with the next requests.
- If the worker thread ends anyway, it fails every request it holds on its way out; from then on
  :meth:`Batcher.health` reports it dead and :meth:`Batcher.submit` raises
  :class:`WorkerUnavailable` at once instead of queueing work nobody will do. A worker that has
  had work but made no progress (no model call) for ``stall_timeout_s`` is reported stuck the
  same way, until it makes progress again.
- :meth:`Batcher.shutdown` refuses new work and asks the worker to stop: it stops before its next
  model call, and every queued or running request gets :class:`ServerClosed`. :meth:`Batcher.stop`
  then waits for the worker until a deadline and logs (and returns ``False``) when it could not.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import torch

from ..generation import generation_kwargs
from .jobs import Job, QueueFull, ServerClosed, TooLarge, WorkerUnavailable
from .logprobs import TokenTexts, entry
from .memory import CacheSizes
from .rows import Row
from .running import RunningBatch
from .sampling import choose_tokens, seeded_generator

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
        max_cache_bytes: int | None = None,
        max_prefill_tokens: int = 4096,
        batch_wait_s: float = 0.005,
        stall_timeout_s: float = 120.0,
        tokenizer_lock: threading.Lock | None = None,
        compile: bool = False,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_queue and max_prefill_tokens must be at least 1")
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        if max_cache_bytes is not None and max_cache_bytes < 1:
            raise ValueError("max_cache_bytes must be a positive number of bytes, or None for no limit")
        self.model = model
        # decoding steps run through torch.compile (dynamic shapes: rows join and leave, the cache grows);
        # prefills run the model as it is
        self.decoder = torch.compile(model, dynamic=True) if compile else model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_cache_bytes = max_cache_bytes
        self.max_prefill_tokens = max_prefill_tokens
        self._sizes: CacheSizes | None = None  # bytes a row's caches take, for admission by memory
        self.batch_wait_s = batch_wait_s
        self.stall_timeout_s = stall_timeout_s
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        base = generation_kwargs(processor, max_new_tokens=1)
        self.pad_id: int = base["pad_token_id"]
        self.eos_ids: set[int] = set(base.get("eos_token_id", []))
        self.token_texts = TokenTexts(processor.tokenizer)  # each token's text and bytes, for logprobs
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: RunningBatch | None = None
        self._admitting: list[Row] = []  # rows being prefilled, not yet in the running batch
        self._stopping = False
        self._deadline: float | None = None  # when shutdown must be over
        self._thread: threading.Thread | None = None
        self._working = False  # the worker holds work (admitting or running rows)
        self._beat = time.monotonic()  # the worker's last sign of progress
        self.death: str | None = None  # why the worker ended unexpectedly
        # Called with the jobs of each model call, a prefill or a decoding step, before it (tests use it to
        # make one fail or stall).
        self.step_hook: Callable[[list[Job]], None] | None = None
        self.steps_run = 0  # decoding steps run, for tests and metrics
        self.prefills_run = 0
        self.steps_failed = 0  # prefills and decoding steps that raised
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
            raise TooLarge(f"n={job.n} is more than the server's max batch size {self.max_batch_size}", "n")
        if self.max_cache_bytes is not None:
            need = self.cache_need([job], alone=True)
            if need > self.max_cache_bytes:
                raise TooLarge(
                    f"this request's caches would take {need / 2**20:.1f} MiB, more than the server's cache budget of "
                    f"{self.max_cache_bytes / 2**20:.1f} MiB: ask for fewer tokens, fewer choices (n) or fewer images",
                    "max_tokens")
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
        """Rows in flight: running, or being prefilled to join."""
        running = self._running
        return len(self._admitting) + (0 if running is None else len(running.rows))

    @property
    def jobs(self) -> list[Job]:
        """Every job held: queued, or with rows in the running batch (a snapshot)."""
        with self._cond:
            queued = list(self._pending)
        running = self._running
        return queued + _jobs_of(self._admitting + ([] if running is None else running.rows))

    def cache_need(self, jobs: list[Job], alone: bool = False) -> int:
        """Bytes the running batch's caches would take with ``jobs`` admitted, at every row's longest length:
        KV positions for all rows at the longest row's prompt + answer (rows are padded to one width),
        plus the cross-attention keys and values of each row's images. ``alone``: without the running rows."""
        running = None if alone else self._running
        rows: list[tuple[Job, int]] = []  # (job, its prompt's positions in the model) of every row
        if running is not None:  # a running row's own length, grown (xGen-MM) prompts included
            # a row's length counts its prompt and the tokens fed so far: all it chose but the last
            rows = [(r.job, n - len(r.tokens) + 1) for r, n in zip(running.rows, running.lengths)]
        rows += [(job, job.lm_length or len(job.input_ids)) for job in jobs for _ in range(job.n)]
        if not rows:
            return 0
        if self._sizes is None:
            self._sizes = CacheSizes(self.model)
        width = max(prompt + job.max_new_tokens for job, prompt in rows)
        images = sum(0 if job.pixel_values is None else job.pixel_values.shape[0] for job, _ in rows)
        return self._sizes.kv_per_position * width * len(rows) + self._sizes.media_per_image * images

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
            jobs += _jobs_of(self._admitting + (self._running.rows if self._running is not None else []))
            self._running = None
            self._admitting = []
            self._working = False
            for job in jobs:
                job.emit(("error", error))

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._running is None:
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
            if jobs:
                self._admit(jobs)
            if self._stopping:
                return
            if self._running is not None:
                self._decode()

    def _take(self) -> list[Job]:
        """The waiting jobs to admit now, in arrival order: within the free rows, the cache budget and
        the prefill budget (the first job always, when it fits the rows and the cache)."""
        if self._running is not None and not self._running.joinable:
            return []  # this LM's cache cannot take newcomers: they start when the running rows are done
        free = self.max_batch_size - self.active_rows
        jobs: list[Job] = []
        prefill = 0
        while self._pending and self._pending[0].n <= free:
            job = self._pending[0]
            if job.cancelled.is_set():
                self._pending.popleft()
                self.rows_cancelled += job.n
                continue
            tokens = job.n * (job.lm_length or len(job.input_ids))
            if jobs and prefill + tokens > self.max_prefill_tokens:
                break
            if self.max_cache_bytes is not None and self.cache_need(jobs + [job]) > self.max_cache_bytes:
                break
            jobs.append(self._pending.popleft())
            free -= job.n
            prefill += tokens
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the newcomers and add them to the running batch; a failure fails them only."""
        rows = []
        for job in jobs:
            generator = seeded_generator(job.sampling, self.model.device)
            for i in range(job.n):
                rows.append(Row(job, i))
                rows[-1].generator = generator
        self._admitting = rows
        self.max_rows_seen = max(self.max_rows_seen, self.active_rows)
        try:
            if self.step_hook is not None:
                self.step_hook(jobs)
            with torch.no_grad():
                batch, logits = RunningBatch.prefill(self.model, rows, self.pad_id)
                self.prefills_run += 1
                self._beat = time.monotonic()
                self._choose(batch, logits)
            alive = [i for i, r in enumerate(batch.rows) if not r.done]
            if alive:  # (rows done at their first token never join)
                if len(alive) < len(batch.rows):
                    batch.keep(alive)
                if self._running is None:
                    self._running = batch
                else:
                    self._running.join(batch, self.model)
            self._admitting = []
        except Exception as e:  # noqa: BLE001 (reported to the requests, the worker goes on)
            log.exception("prefilling %d new row(s) failed; failing their requests", len(rows))
            self._admitting = []
            self.steps_failed += 1
            failed = [r for r in rows if not r.done]
            for row in rows:
                row.done = True
            self._fail(failed, e)
        # (anything else, BaseException, leaves the rows in _admitting: the worker's way out answers them)

    def _decode(self) -> None:
        """One decoding step of the running batch; an exception fails its rows and drops it with its caches."""
        running = self._running
        try:
            if self.step_hook is not None:
                self.step_hook(_jobs_of(running.rows))
            if self._stopping:
                return  # the worker's way out answers the rows still running
            with torch.no_grad():
                logits = running.step(self.decoder)
                self.steps_run += 1
                self._choose(running, logits)
            alive = [i for i, r in enumerate(running.rows) if not r.done]
            if not alive:
                self._running = None
            elif len(alive) < len(running.rows):
                running.keep(alive)
        except Exception as e:  # noqa: BLE001 (the batch's rows fail; the worker goes on with new requests)
            log.exception("a decoding step of %d row(s) failed; failing their requests", len(running.rows))
            self._running = None  # before the answers go out: whoever reads them sees the batch gone
            self.steps_failed += 1
            failed = [r for r in running.rows if not r.done]
            for row in running.rows:
                row.done = True
            self._fail(failed, e)

    def _choose(self, batch: RunningBatch, logits: torch.Tensor) -> None:
        """Each row's next token from ``logits`` (B, V): chosen, kept as the row's next input, handed to its job."""
        rows = batch.rows
        tokens = choose_tokens(logits, [r.job.sampling for r in rows], [r.generator for r in rows])
        batch.last = tokens
        logprobs = torch.log_softmax(logits.float(), dim=-1) if any(r.entries is not None for r in rows) else None
        self._step(rows, tokens.tolist(), logprobs)

    def _fail(self, rows: list[Row], error: BaseException) -> None:
        for job in {id(r.job): r.job for r in rows}.values():
            job.emit(("error", error))

    # -- per-token bookkeeping --
    def _step(self, rows: list[Row], tokens: list[int], logprobs: torch.Tensor | None = None) -> None:
        """Hand each row its new token (and its log-probability entry when asked); finish rows by their rules."""
        self._beat = time.monotonic()
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.done:
                continue
            if row.job.cancelled.is_set():
                row.done = True
                self.rows_cancelled += 1
                continue
            row.tokens.append(token)
            if row.entries is not None and logprobs is not None and token not in self.eos_ids:
                with self.tokenizer_lock:
                    row.entries.append(entry(logprobs[i], token, row.job.logprobs or 0, self.token_texts))
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


def _jobs_of(rows: list[Row]) -> list[Job]:
    """The jobs with a row still running (each once, in order)."""
    return list({id(r.job): r.job for r in rows if not r.done}.values())
