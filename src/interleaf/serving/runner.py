"""Running the app with uvicorn: in the foreground (:func:`serve`) or in a background thread
(:class:`ServerThread`), with a shutdown that cancels the batcher's work first (:class:`Server`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


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
