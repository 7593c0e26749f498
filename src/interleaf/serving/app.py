"""The OpenAI-compatible HTTP server (FastAPI) and the web playground.

Routes:

- ``POST /v1/chat/completions``: OpenAI Chat Completions, with text and ``image_url`` parts
  (``data:`` URLs; http(s) only when the operator allows URLs), ``stream`` (server-sent
  events ending with ``data: [DONE]``), ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``n``, ``seed`` and ``stream_options.include_usage``.
- ``GET /v1/models``, ``GET /health``, and the playground at ``/`` (files under ``/static``).

Requests are validated and their images decoded in the request's own thread; generation runs
in the :class:`~interleaf.serving.batcher.Batcher`'s worker. The body size is checked before the
body is parsed, an optional API key (``Authorization: Bearer ...``) guards ``/v1``, and every
error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, OfflineError
from ..processing.images import load_image
from .batcher import Batcher, Job, QueueFull, Sampling, ServerClosed, WorkerUnavailable
from .limits import ServeLimits, URLPolicy, fetch_image_url
from .schemas import (
    ChatCompletionRequest,
    chunk,
    completion,
    error_body,
    new_id,
    usage,
    validation_message,
)

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI's error object with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


class _Prepared:
    def __init__(self, input_ids: list[int], pixel_values, max_new_tokens: int):
        self.input_ids = input_ids
        self.pixel_values = pixel_values
        self.max_new_tokens = max_new_tokens


class ChatService:
    """Validation and prompt building for the chat route (no HTTP here)."""

    def __init__(self, model, processor, model_name: str, limits: ServeLimits, policy: URLPolicy,
                 lock: threading.Lock):
        self.model, self.processor, self.model_name = model, processor, model_name
        self.limits, self.policy, self.lock = limits, policy, lock

    def check(self, req: ChatCompletionRequest) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", "model", "model_not_found")
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

    def prepare(self, req: ChatCompletionRequest) -> _Prepared:
        """Messages -> token ids and pixels; every problem is an :class:`APIError` (400)."""
        messages = self._messages(req)
        try:
            with self.lock:
                inputs = self.processor([messages])
        except (InputError, OfflineError) as e:
            raise APIError(400, str(e), "messages") from e
        ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
        pixels = inputs["pixel_values"][0] if "pixel_values" in inputs else None  # (N_max, 3, S, S)
        if pixels is not None:
            pixels = pixels[: sum(1 for i in ids if i == self.processor.image_token_id)]
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens, more than this server's limit of "
                                f"{self.limits.max_prompt_tokens}; shorten the conversation", "messages",
                           "context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        max_new = asked or self.limits.max_completion_tokens
        context = getattr(self.processor, "max_length", None)
        if context is not None and len(ids) + max_new > context:
            if asked is not None or len(ids) >= context:
                raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_new}) is more than the "
                                    f"model's context of {context} tokens; shorten the prompt or ask for fewer "
                                    "tokens", "messages", "context_length_exceeded")
            max_new = context - len(ids)
        return _Prepared(ids, pixels, max_new)

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


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(
    model,
    processor,
    *,
    model_name: str = "interleaf",
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    url_policy: URLPolicy | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    round_tokens: int = 8,
    stall_timeout_s: float = 120.0,
    shutdown_timeout_s: float = 10.0,
) -> FastAPI:
    """The FastAPI app serving ``model`` as ``model_name``.

    Its batching worker runs for the app's lifespan: it starts when the server starts and is stopped
    (queued and running requests cancelled, the worker awaited for at most ``shutdown_timeout_s``)
    when the server shuts down. ``/health`` answers 503 while the worker is dead, or holds work but
    made no progress for ``stall_timeout_s``; new requests then fail at once with 503.
    """
    limits = limits or ServeLimits()
    policy = url_policy or URLPolicy()
    for name, value in (("shutdown_timeout_s", shutdown_timeout_s), ("stall_timeout_s", stall_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{name} must be a positive number of seconds, got {value!r}")
    lock = threading.Lock()
    processor.max_images = limits.max_images
    processor.max_pixels = limits.max_image_pixels
    batcher = Batcher(model, processor, max_batch_size=max_batch_size, max_queue=max_queue,
                      round_tokens=round_tokens, stall_timeout_s=stall_timeout_s, tokenizer_lock=lock)
    service = ChatService(model, processor, model_name, limits, policy, lock)
    key = api_key.encode() if api_key else None

    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop, shutdown_timeout_s)

    app = FastAPI(title="interleaf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.service = service
    app.state.shutdown_timeout_s = shutdown_timeout_s

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 else f"unknown route {request.method} {request.url.path}"
        return APIError(exc.status_code, str(message), code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, f"invalid request: {exc.errors()[:3]}").response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, f"internal server error ({type(exc).__name__}); see the server log").response()

    def authorize(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        ok, why = batcher.health()
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "queued": batcher.pending,
                "running": batcher.active_rows, "rounds_failed": batcher.rounds_failed}
        if not ok:
            body["reason"] = why
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "interleaf"}
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request) -> dict:
        authorize(request)
        if name != model_name:
            raise APIError(404, f"The model {name!r} does not exist", "model", "model_not_found")
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "interleaf"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_body(request, limits.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from e
        if not isinstance(payload, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(payload)
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param) from e
        service.check(req)
        prepared = await run_in_threadpool(service.prepare, req)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sampling = Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        job = Job(
            input_ids=prepared.input_ids, pixel_values=prepared.pixel_values,
            max_new_tokens=prepared.max_new_tokens, n=req.n, sampling=sampling, stop=req.stop_list(),
            sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from e
        except ServerClosed as e:
            raise APIError(503, str(e), code="shutting_down") from e
        except WorkerUnavailable as e:
            raise APIError(503, f"the server cannot run requests now: {e}", code="worker_unavailable") from e
        except ValueError as e:  # n larger than the batch
            raise APIError(400, str(e), "n") from e
        prompt_tokens = len(prepared.input_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, events, req.n, model_name, prompt_tokens, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts = [""] * req.n
        reasons: list[str | None] = [None] * req.n
        completion_tokens = 0
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job, events))
        try:
            while any(r is None for r in reasons):
                event = await events.get()
                if event[0] == "delta":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                    completion_tokens += event[3]
                elif event[0] == "gone":
                    return Response(status_code=499)  # nobody reads it: the client closed the connection
                else:
                    raise _job_error(event[1])
        finally:
            job.cancel()  # complete, failed, or the client went away: free its rows
            watcher.cancel()
        choices = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
             "logprobs": None}
            for i in range(req.n)
        ]
        return completion(new_id(), model_name, choices, usage(prompt_tokens, completion_tokens))

    @app.get("/", include_in_schema=False)
    async def playground():
        headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
                                              "style-src 'self'; script-src 'self'; object-src 'none'"}
        return FileResponse(STATIC_DIR / "index.html", headers=headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _cancel_on_disconnect(request: Request, job: Job, events: asyncio.Queue) -> None:
    """When the client disconnects, cancel ``job`` and wake its handler (the body has been read, so
    the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            events.put_nowait(("gone",))
            return


def _job_error(error: BaseException) -> APIError:
    if isinstance(error, ServerClosed):
        return APIError(503, str(error), code="shutting_down")
    if isinstance(error, WorkerUnavailable):
        return APIError(503, str(error), code="worker_unavailable")
    if isinstance(error, (InputError, OfflineError)):
        return APIError(400, str(error))
    return APIError(500, f"generation failed ({type(error).__name__}: {error}); see the server log", code="generation_failed")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before parsing anything."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as e:
            raise APIError(400, "invalid Content-Length header") from e
        if size > limit:
            raise APIError(413, f"the request body is {size:,} bytes, more than this server's limit of {limit:,}; "
                                "send smaller images", code="request_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise APIError(413, f"the request body is more than this server's limit of {limit:,} bytes",
                           code="request_too_large")
    return bytes(data)


async def _stream(job: Job, events: asyncio.Queue, n: int, model_name: str, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    cid, created = new_id(), int(time.time())
    finished = 0
    completion_tokens = 0
    try:
        yield _sse(chunk(cid, model_name, created, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
            for i in range(n)
        ]))
        while finished < n:
            event = await events.get()
            if event[0] == "delta":
                choice = {"index": event[1], "delta": {"content": event[2]}, "finish_reason": None, "logprobs": None}
                yield _sse(chunk(cid, model_name, created, [choice]))
            elif event[0] == "finish":
                finished += 1
                completion_tokens += event[3]
                choice = {"index": event[1], "delta": {}, "finish_reason": event[2], "logprobs": None}
                yield _sse(chunk(cid, model_name, created, [choice]))
            else:
                err = _job_error(event[1])
                yield _sse(error_body(err.message, err.type, err.param, err.code))
                break
        if include_usage:
            yield _sse(chunk(cid, model_name, created, [], usage(prompt_tokens, completion_tokens)))
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away, or the answer is complete: free its rows


class Server(uvicorn.Server):
    """uvicorn's server, which also cancels the app's batching work as soon as shutdown begins.

    Without this, uvicorn would first wait for the open requests to finish, which a stopped or
    stuck worker never does. ``on_started(host, port)`` is called with the bound port (``port=0``
    lets the system choose one).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "info",
                 on_started=None):
        self.app = app
        self.timeout_s = float(getattr(app.state, "shutdown_timeout_s", 10.0))
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                        timeout_graceful_shutdown=self.timeout_s))
        self.on_started = on_started
        self.bound_port: int | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            self.bound_port = self.servers[0].sockets[0].getsockname()[1]
        if self.on_started is not None and self.started:
            self.on_started(self.config.host, self.bound_port)

    async def shutdown(self, sockets=None) -> None:
        start = time.monotonic()
        batcher = getattr(self.app.state, "batcher", None)
        if batcher is not None:
            batcher.shutdown(self.timeout_s)  # the worker stops at its next step; its requests get 503
            if not await asyncio.to_thread(batcher.wait, self.timeout_s / 2):
                answered = batcher.abandon()  # a worker stuck in a model call: answer its requests for it
                log.warning("the batching worker is still running after %.1f s; answered its %d request(s) with 503",
                            time.monotonic() - start, answered)
        self.config.timeout_graceful_shutdown = max(0.1, self.timeout_s - (time.monotonic() - start))
        await super().shutdown(sockets)


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, notebooks): ``with ServerThread(app) as s: s.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.host = host
        self.app = app
        self.server = Server(app, host=host, port=port, log_level=log_level)
        self.thread = threading.Thread(target=self.server.run, name="interleaf-server", daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.bound_port
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Shut down; True when the server thread ended within ``timeout`` (default: the app's shutdown timeout + 5 s)."""
        self.server.should_exit = True
        self.thread.join(timeout if timeout is not None else self.server.timeout_s + 5)
        return not self.thread.is_alive()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", on_started=None) -> None:
    """Serve ``app`` in the foreground until SIGINT/SIGTERM; shutdown takes at most the app's shutdown timeout."""
    Server(app, host=host, port=port, log_level=log_level, on_started=on_started).run()
