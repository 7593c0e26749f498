"""Serving: an OpenAI-compatible HTTP server with dynamic batching, a chat REPL, a web playground.

- :func:`create_app` builds the FastAPI app from the chat service (:mod:`.service`) and its routes
  (:mod:`.routes`); ``interleaf serve`` runs it with uvicorn (:func:`serve`), :class:`ServerThread`
  in a background thread.
- :class:`Batcher` batches concurrent requests through ``model.generate`` (see its module).
- :func:`run_chat` is the terminal chat (``interleaf chat``).
"""

from .app import create_app
from .batcher import Batcher
from .chat_repl import run_chat
from .jobs import Job, QueueFull, Sampling
from .limits import ServeLimits, URLPolicy
from .runner import ServerThread, serve
from .service import APIError

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
