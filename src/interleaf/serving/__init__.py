"""Serving: an OpenAI-compatible HTTP server with continuous batching, a chat REPL, a web playground.

- :func:`create_app` builds the FastAPI app from the chat service (:mod:`.service`) and its routes
  (:mod:`.routes`); ``interleaf serve`` runs it with uvicorn (:func:`serve`), :class:`ServerThread`
  in a background thread.
- :class:`Batcher` runs concurrent requests as one continuous batch: each joins at the next decoding
  step and leaves when done (see its module, and :mod:`.running` for the batch's caches).
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
