"""The HTTP routes of the OpenAI-compatible server (FastAPI) and the web playground.

Routes:

- ``POST /v1/chat/completions``: OpenAI Chat Completions, with text and ``image_url`` parts
  (``data:`` URLs; http(s) only when the operator allows URLs), ``stream`` (server-sent
  events ending with ``data: [DONE]``), ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``n``, ``seed``, ``stream_options.include_usage``,
  ``logprobs`` / ``top_logprobs`` and ``response_format`` ``text`` (what happens to every other
  OpenAI field: :mod:`interleaf.serving.schemas`).
- ``GET /v1/models``, ``GET /health``, and the playground at ``/`` (files under ``/static``).

The routes speak HTTP only: the body size is checked before the body is parsed, an optional API
key (``Authorization: Bearer ...``) guards ``/v1``, and every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` object. What a request means is the
:class:`~interleaf.serving.service.ChatService`'s business; its validation and image decoding run
in a worker thread of the server, generation in the batcher's worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .jobs import Job
from .service import Answer, APIError, ChatService, ChunkStream

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
_PLAYGROUND_CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
                   "style-src 'self'; script-src 'self'; object-src 'none'")


def error_response(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), exc.status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error object; an unexpected one as a 500 (logged)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 else f"unknown route {request.method} {request.url.path}"
        code = "not_found" if exc.status_code == 404 else None
        return error_response(APIError(exc.status_code, str(message), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, f"invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(APIError(500, f"internal server error ({type(exc).__name__}); see the server log"))


def add_routes(app: FastAPI, service: ChatService, api_key: str | None) -> None:
    """The API routes (guarded by ``api_key`` when given) and the playground."""
    key = api_key.encode() if api_key else None

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
        ok, body = service.health()
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [service.model_entry()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request) -> dict:
        authorize(request)
        return service.model_entry(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = service.parse(await _read_body(request, service.limits.max_body_bytes))
        service.check(req)
        prepared = await run_in_threadpool(service.prepare, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = service.submit(req, prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        prompt_tokens = len(prepared.input_ids)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = ChunkStream(req.n, service.model_name, prompt_tokens, include_usage)
            return StreamingResponse(_stream(job, events, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = Answer(req.n, logprobs=bool(req.logprobs))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job, events))
        try:
            while not answer.complete:
                event = await events.get()
                if event[0] == "gone":
                    return Response(status_code=499)  # nobody reads it: the client closed the connection
                answer.add(event)
        finally:
            job.cancel()  # complete, failed, or the client went away: free its rows
            watcher.cancel()
        return answer.body(service.model_name, prompt_tokens)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": _PLAYGROUND_CSP})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _stream(job: Job, events: asyncio.Queue, chunks: ChunkStream) -> AsyncIterator[bytes]:
    try:
        yield _sse(chunks.opening())
        while not chunks.complete:
            yield _sse(chunks.on(await events.get()))
        for last in chunks.closing():
            yield _sse(last)
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away, or the answer is complete: free its rows


async def _cancel_on_disconnect(request: Request, job: Job, events: asyncio.Queue) -> None:
    """When the client disconnects, cancel ``job`` and wake its handler (the body has been read, so
    the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            events.put_nowait(("gone",))
            return


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
