"""Serving: an OpenAI-compatible HTTP server with dynamic batching, a chat REPL, a web playground.

- :func:`create_app` builds the FastAPI app (``interleaf serve`` runs it with uvicorn);
  :class:`ServerThread` runs one in a background thread.
- :class:`Batcher` batches concurrent requests through ``model.generate`` (see its module).
- :func:`run_chat` is the terminal chat (``interleaf chat``).
"""

from .app import APIError, ServerThread, create_app, serve
from .batcher import Batcher, Job, QueueFull, Sampling
from .chat_repl import run_chat
from .limits import ServeLimits, URLPolicy

__all__ = [
    "APIError",
    "Batcher",
    "Job",
    "QueueFull",
    "Sampling",
    "ServeLimits",
    "ServerThread",
    "URLPolicy",
    "create_app",
    "run_chat",
    "serve",
]
