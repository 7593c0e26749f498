"""The OpenAI-compatible server: :func:`create_app` puts the batcher, the chat service and the routes together.

- :mod:`~interleaf.serving.routes`: the HTTP routes and the playground;
- :mod:`~interleaf.serving.service`: what a chat request means (validation, prompt, job, answer);
- :mod:`~interleaf.serving.batcher`: the worker that generates for many requests at once;
- :mod:`~interleaf.serving.runner`: uvicorn, in the foreground or in a thread.

Every model interleaf builds is served and batched: both fusion families, and token-insertion
models that tile images at any resolution (LLaVA-NeXT, xGen-MM instruct), whose requests carry each
image's views and size (:class:`~interleaf.serving.jobs.Job`).
"""

from __future__ import annotations

import asyncio
import threading

from fastapi import FastAPI

from ..errors import InputError
from .batcher import Batcher
from .limits import ServeLimits, URLPolicy
from .routes import add_error_handlers, add_routes
from .service import ChatService


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
    max_cache_bytes: int | None = None,
    max_prefill_tokens: int = 4096,
    compile: bool = False,
    stall_timeout_s: float = 120.0,
    shutdown_timeout_s: float = 10.0,
) -> FastAPI:
    """The FastAPI app serving ``model`` as ``model_name``.

    Its batching worker runs for the app's lifespan: it starts when the server starts and is stopped
    (queued and running requests cancelled, the worker awaited for at most ``shutdown_timeout_s``)
    when the server shuts down. ``/health`` answers 503 while the worker is dead, or holds work but
    made no progress for ``stall_timeout_s``; new requests then fail at once with 503.

    Admission (:class:`~interleaf.serving.batcher.Batcher`): at most ``max_batch_size`` rows in flight,
    their KV and image caches within ``max_cache_bytes`` (None: no limit), and at most
    ``max_prefill_tokens`` prompt tokens prefilled between two decoding steps. ``compile``: decoding
    steps through ``torch.compile`` (the first steps compile; measured in the README's Performance section).
    """
    limits = limits or ServeLimits()
    policy = url_policy or URLPolicy()
    for name, value in (("shutdown_timeout_s", shutdown_timeout_s), ("stall_timeout_s", stall_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{name} must be a positive number of seconds, got {value!r}")
    counts = {"max_batch_size": max_batch_size, "max_queue": max_queue, "max_prefill_tokens": max_prefill_tokens,
              "max_cache_bytes": max_cache_bytes}
    for name, value in counts.items():
        if value is None and name == "max_cache_bytes":  # no memory limit
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number of at least 1, got {value!r}")
    lock = threading.Lock()
    processor.max_images = limits.max_images
    processor.max_pixels = limits.max_image_pixels
    batcher = Batcher(model, processor, max_batch_size=max_batch_size, max_queue=max_queue,
                      max_cache_bytes=max_cache_bytes, max_prefill_tokens=max_prefill_tokens,
                      stall_timeout_s=stall_timeout_s, tokenizer_lock=lock, compile=compile)
    service = ChatService(processor, batcher, model_name, limits, policy, lock)

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
    add_error_handlers(app)
    add_routes(app, service, api_key)
    return app

