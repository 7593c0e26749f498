"""The chat service behind the HTTP routes: validation, prompt building, jobs and answers (no HTTP here).

A chat request goes through :class:`ChatService` in this order::

    body bytes ──► parse (JSON, schema) ──► check (model, n, stop, max_tokens against the limits)
      ──► prepare (messages and images ──► processor ──► token ids, pixels (N_img, 3, S, S) or,
                   for any-resolution models, each image's views (N_img, V, 3, S, S) and sizes
                   (N_img, 2), max new tokens)
      ──► submit (a Job in the batcher's queue; its events come back through a sink)
      ──► Answer (one chat.completion) or ChunkStream (chat.completion.chunk objects)

Every problem a client can cause is an :class:`APIError` carrying the HTTP status and OpenAI's
error fields; :mod:`interleaf.serving.routes` turns it into the response.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import ValidationError

from ..errors import InputError, OfflineError
from ..processing.images import load_image
from .batcher import Batcher
from .jobs import Event, Job, QueueFull, Sampling, ServerClosed, TooLarge, WorkerUnavailable
from .limits import ServeLimits, URLPolicy, fetch_image_url
from .logprobs import choice_logprobs
from .schemas import ChatCompletionRequest, chunk, completion, error_body, new_id, usage, validation_message

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI's error object with HTTP status ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        """OpenAI's ``{"error": {...}}`` object."""
        return error_body(self.message, self.type, self.param, self.code)


def job_error(error: BaseException) -> APIError:
    """The answer to a job that failed with ``error`` (an ``("error", exc)`` event)."""
    if isinstance(error, ServerClosed):
        return APIError(503, str(error), code="shutting_down")
    if isinstance(error, WorkerUnavailable):
        return APIError(503, str(error), code="worker_unavailable")
    if isinstance(error, (InputError, OfflineError)):
        return APIError(400, str(error))
    return APIError(500, f"generation failed ({type(error).__name__}: {error}); see the server log", code="generation_failed")


@dataclass
class Prepared:
    """A request ready for the batcher."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (N_img, 3, S, S), or (N_img, V, 3, S, S) with image_sizes
    max_new_tokens: int
    image_sizes: torch.Tensor | None = None  # (N_img, 2), any-resolution models only
    lm_length: int | None = None  # the prompt's positions in the model, its images grown (xGen-MM)


def request_images(inputs, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``count`` images of a one-request processor output ``inputs``, as a :class:`Job` carries them.

    One view per image: ``pixel_values`` ``(1, N_max, 3, S, S)`` -> ``(N_img, 3, S, S)``. Any
    resolution (``image_sizes`` present): the images' views ``(K, V, 3, S, S)`` (the batch's images
    in reading order, zero-padded on the view axis) and their sizes ``(K, 2)``, kept as they are.
    """
    if "pixel_values" not in inputs or not count:
        return None, None
    pixels, sizes = inputs["pixel_values"], inputs.get("image_sizes")
    if sizes is None:
        return pixels[0][:count], None
    return pixels[:count], torch.as_tensor(sizes)[:count]


def added_positions(processor, count: int, sizes: torch.Tensor | None) -> int:
    """How many positions a request's ``count`` images add to its text inside the model: under placement
    ``replace`` (xGen-MM) each ``<image>`` token becomes the image's whole sequence
    (:meth:`~interleaf.processing.prompt_format.PromptFormat.lm_token_count`, of its ``image_sizes`` under
    xGen-MM's tiling); 0 for every other model, whose text already holds each image's positions."""
    fmt = getattr(processor, "format", None)
    if not count or fmt is None or not fmt.grows_images:
        return 0
    images = [tuple(size) for size in sizes.tolist()] if sizes is not None else [None] * count
    return sum(fmt.lm_token_count(image) - 1 for image in images)


class ChatService:
    """Serves ``model_name`` through ``batcher``: requests in, jobs out, within ``limits``.

    ``lock`` guards the processor's tokenizer, which the batcher's worker also uses. The context check
    counts what the model runs: the text and the positions its images add (:func:`added_positions`).
    """

    def __init__(self, processor, batcher: Batcher, model_name: str, limits: ServeLimits, policy: URLPolicy,
                 lock: threading.Lock):
        self.processor, self.batcher, self.model_name = processor, batcher, model_name
        self.limits, self.policy, self.lock = limits, policy, lock

    # -- what GET routes answer --
    def model_entry(self, name: str | None = None) -> dict:
        """``GET /v1/models/{name}`` (the served model when ``name`` is None)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist", "model", "model_not_found")
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "interleaf"}

    def health(self) -> tuple[bool, dict]:
        """(ok, body) of ``GET /health``."""
        ok, why = self.batcher.health()
        body = {"status": "ok" if ok else "unavailable", "model": self.model_name, "queued": self.batcher.pending,
                "running": self.batcher.active_rows, "failures": self.batcher.steps_failed}
        if not ok:
            body["reason"] = why
        return ok, body

    # -- a chat request, step by step --
    def parse(self, body: bytes) -> ChatCompletionRequest:
        """The request in ``body`` (JSON), validated against the schema."""
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from e
        if not isinstance(payload, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return ChatCompletionRequest.model_validate(payload)
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param) from e

    def check(self, req: ChatCompletionRequest) -> None:
        """The request against the served model and this server's limits (cheap; before any tokenising)."""
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", "model", "model_not_found")
        check_fields(req)
        if req.n > self.limits.max_n:
            raise APIError(400, f"n={req.n} is more than this server's limit of {self.limits.max_n}", "n")
        stops = req.stop_list()
        if len(stops) > self.limits.max_stop or any(not s for s in stops):
            raise APIError(400, f"stop: give at most {self.limits.max_stop} non-empty strings", "stop")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > self.limits.max_completion_tokens:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param}={asked} is more than this server's limit of "
                                f"{self.limits.max_completion_tokens}", param)

    def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Messages -> token ids and pixels; every problem is an :class:`APIError` (400)."""
        messages = self._messages(req)
        try:
            with self.lock:
                inputs = self.processor([messages])
        except (InputError, OfflineError) as e:
            raise APIError(400, str(e), "messages") from e
        ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
        count = sum(1 for m in messages if isinstance(m["content"], list)
                    for part in m["content"] if part.get("type") == "image")
        pixels, sizes = request_images(inputs, count)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens, more than this server's limit of "
                                f"{self.limits.max_prompt_tokens}; shorten the conversation", "messages",
                           "context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        max_new = asked or self.limits.max_completion_tokens
        context = getattr(self.processor, "max_length", None)
        grown = added_positions(self.processor, count, sizes)
        length = len(ids) + grown  # the positions the model runs for the prompt
        if context is not None and length + max_new > context:
            if asked is not None or length >= context:
                what, fix = f"{length} tokens", "shorten the prompt"
                if grown:
                    what = f"{length} tokens with its images inserted"
                    fix = "shorten the prompt, send fewer or smaller images"
                raise APIError(400, f"the prompt ({what}) plus max_tokens ({max_new}) is more than the model's "
                                    f"context of {context} tokens; {fix} or ask for fewer tokens", "messages",
                               "context_length_exceeded")
            max_new = context - length
        return Prepared(ids, pixels, max_new, sizes, length)

    def submit(self, req: ChatCompletionRequest, prepared: Prepared, sink: Callable[[Event], None]) -> Job:
        """Queue the request's job; its events go to ``sink`` (from the worker thread)."""
        job = Job(
            input_ids=prepared.input_ids, pixel_values=prepared.pixel_values, image_sizes=prepared.image_sizes,
            max_new_tokens=prepared.max_new_tokens, n=req.n, stop=req.stop_list(), sink=sink,
            sampling=Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed), logprobs=req.top_count(),
            lm_length=prepared.lm_length,
        )
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from e
        except ServerClosed as e:
            raise APIError(503, str(e), code="shutting_down") from e
        except WorkerUnavailable as e:
            raise APIError(503, f"the server cannot run requests now: {e}", code="worker_unavailable") from e
        except TooLarge as e:  # n larger than the batch, or caches larger than the server's budget
            raise APIError(400, str(e), e.param) from e
        return job

    def _messages(self, req: ChatCompletionRequest) -> list[dict]:
        out: list[dict] = []
        images = 0
        for m, message in enumerate(req.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None or isinstance(content, str):
                out.append({"role": role, "content": content or ""})
                continue
            parts: list[dict] = []
            for p, part in enumerate(content):
                where = f"messages[{m}].content[{p}]"
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise APIError(400, f"{where}: a text part needs a string 'text'", f"{where}.text")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    images += 1
                    if images > self.limits.max_images:
                        raise APIError(400, f"{where}: more than {self.limits.max_images} images in one request; "
                                            "send fewer images", where, "too_many_images")
                    parts.append({"type": "image", "image": self._image(part, where)})
                else:
                    raise APIError(400, f"{where}: unsupported content part type {kind!r}; use 'text' or "
                                        "'image_url'", f"{where}.type", "invalid_content_part")
            out.append({"role": role, "content": parts})
        return out

    def _image(self, part: dict, where: str):
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url.strip():
            raise APIError(400, f"{where}: an image_url part needs {{'image_url': {{'url': '...'}}}}", f"{where}.image_url")
        url = url.strip()
        detail = spec.get("detail") if isinstance(spec, dict) else None
        if detail is not None and detail not in IMAGE_DETAILS:
            raise APIError(400, f"{where}: image_url.detail must be one of {', '.join(IMAGE_DETAILS)} (it is accepted "
                                f"and has no effect here), not {detail!r}", f"{where}.image_url.detail")
        try:
            if url.startswith("data:"):
                return load_image(url, where=where, max_pixels=self.limits.max_image_pixels,
                                  max_bytes=self.limits.max_body_bytes)
            data = fetch_image_url(url, self.policy, self.limits, where)  # refuses file:, paths, private hosts
            return load_image(data, where=where, max_pixels=self.limits.max_image_pixels)
        except OfflineError as e:
            raise APIError(400, str(e), f"{where}.image_url", "image_urls_disabled") from e
        except InputError as e:
            code = "image_too_large" if "pixels" in str(e) else "invalid_image"
            raise APIError(400, str(e), f"{where}.image_url", code) from e


IMAGE_DETAILS = ("auto", "low", "high", "original")
"""``image_url.detail`` values accepted; none changes how an image is processed (the model's processor decides)."""


def check_fields(req: ChatCompletionRequest) -> None:
    """Refuse what the server would otherwise have to ignore: unknown fields, OpenAI fields it does not
    implement (at a value that matters), ``top_logprobs`` without ``logprobs``, JSON response formats."""
    unknown = req.unknown_fields()
    if unknown:
        raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}; OpenAI's Chat Completions "
                            "defines no such field; leave it out", unknown[0], "unknown_parameter")
    unsupported = req.unsupported_fields()
    if unsupported:
        raise APIError(400, f"{', '.join(unsupported)}: not supported by this server (an interleaf model serves plain "
                            "chat); leave it out", unsupported[0], "unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true; set both, or leave top_logprobs out", "top_logprobs")
    kind = req.response_format.type if req.response_format is not None else "text"
    if kind != "text":
        raise APIError(400, f"response_format {{'type': {kind!r}}} is not supported by this server (it does not "
                            "constrain decoding to JSON); ask for JSON in the prompt and parse the answer, or send "
                            "{'type': 'text'}", "response_format.type", "unsupported_response_format")


class Answer:
    """A job's events gathered into one ``chat.completion`` (a request without ``stream``); each choice's
    ``logprobs`` holds its tokens' entries when ``logprobs`` (the request asked), else null."""

    def __init__(self, n: int, logprobs: bool = False):
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.completion_tokens = 0
        self.entries: list[list[dict]] | None = [[] for _ in range(n)] if logprobs else None

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.reasons)

    def add(self, event: Event) -> None:
        """Take one event; an ``("error", exc)`` event raises its :class:`APIError`."""
        if event[0] == "delta":
            self.texts[event[1]] += event[2]
            if len(event) > 3 and self.entries is not None:
                self.entries[event[1]] += event[3]
        elif event[0] == "finish":
            self.reasons[event[1]] = event[2]
            self.completion_tokens += event[3]
        else:
            raise job_error(event[1])

    def body(self, model_name: str, prompt_tokens: int) -> dict:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
             "logprobs": choice_logprobs(self.entries[i] if self.entries is not None else None)}
            for i, (text, reason) in enumerate(zip(self.texts, self.reasons))
        ]
        return completion(new_id(), model_name, choices, usage(prompt_tokens, self.completion_tokens))


class ChunkStream:
    """A job's events as ``chat.completion.chunk`` objects (a request with ``stream``): :meth:`opening`,
    then one chunk per event until :attr:`complete`, then :meth:`closing`. A failed job sends OpenAI's
    error object in place of a chunk and ends the stream."""

    def __init__(self, n: int, model_name: str, prompt_tokens: int, include_usage: bool):
        self.n, self.model_name, self.prompt_tokens, self.include_usage = n, model_name, prompt_tokens, include_usage
        self.id, self.created = new_id(), int(time.time())
        self.finished = 0
        self.completion_tokens = 0
        self.failed = False

    @property
    def complete(self) -> bool:
        return self.failed or self.finished >= self.n

    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        out = chunk(self.id, self.model_name, self.created, choices, usage_)
        if self.include_usage:
            out.setdefault("usage", None)  # as OpenAI: null in every chunk but the last
        return out

    def opening(self) -> dict:
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None} for i in range(self.n)])

    def on(self, event: Event) -> dict:
        if event[0] == "delta":
            entries = event[3] if len(event) > 3 else None
            return self._chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None,
                                 "logprobs": choice_logprobs(entries)}])
        if event[0] == "finish":
            self.finished += 1
            self.completion_tokens += event[3]
            return self._chunk([{"index": event[1], "delta": {}, "finish_reason": event[2], "logprobs": None}])
        self.failed = True
        return job_error(event[1]).body()

    def closing(self) -> list[dict]:
        """The usage chunk, when the request asked for it."""
        if not self.include_usage:
            return []
        return [self._chunk([], usage(self.prompt_tokens, self.completion_tokens))]
