"""``interleaf chat``: a terminal conversation with a model, streamed, with images.

Commands: ``/image PATH`` attaches an image to the next turn, ``/reset`` forgets the
conversation, ``/save FILE`` writes it as JSON (``{"messages": [...]}``, images as paths),
``/quit`` (or end of input) leaves. Every turn renders the whole history with the tokenizer's
chat template. Errors (a bad path, a prompt too long) are printed and the conversation goes on.
Works the same with piped standard input.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch

from ..errors import InterleafError
from ..generation import generation_kwargs, stream_generate
from ..processing.images import load_image

HELP = "commands: /image PATH (attach to the next turn), /reset, /save FILE, /quit"


def stream_reply(model, processor, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0) -> Iterator[str]:
    """Yield the assistant's next message for ``messages``, piece by piece."""
    inputs = processor([messages]).to(model.device)
    kwargs = generation_kwargs(processor, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return stream_generate(model, processor.tokenizer, inputs, kwargs)


def run_chat(
    model,
    processor,
    *,
    input_fn: Callable[[str], str] = input,
    out: TextIO | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[dict]:
    """Run the conversation loop until ``/quit`` or end of input; return the conversation."""
    chat = _Chat(model, processor, out or sys.stdout,
                 dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p))
    chat.say(f"interleaf chat. {HELP}")
    if seed is not None:
        torch.manual_seed(seed)
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            chat.say()
            break
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command.startswith("/"):
            chat.command(command, arg.strip())
        else:
            chat.turn(line)
    return chat.history


class _Chat:
    """One conversation: its history, the images attached to the next turn, and where it prints."""

    def __init__(self, model, processor, out: TextIO, sampling: dict):
        self.model, self.processor, self.out, self.sampling = model, processor, out, sampling
        self.history: list[dict] = []
        self.pending: list[str] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def command(self, command: str, arg: str) -> None:
        """``/reset``, ``/image PATH`` or ``/save FILE``; anything else is answered with the help."""
        if command == "/reset":
            self.history.clear()
            self.pending.clear()
            self.say("(conversation cleared)")
        elif command == "/image":
            self.attach(arg)
        elif command == "/save":
            self.save(arg)
        else:
            self.say(f"error: unknown command {command!r}; {HELP}")

    def attach(self, arg: str) -> None:
        if not arg:
            self.say("error: /image needs a path, e.g. /image photo.jpg")
            return
        path = Path(arg).expanduser().resolve()
        try:
            load_image(path, where=f"/image {arg}", max_pixels=self.processor.max_pixels)
        except InterleafError as e:
            self.say(f"error: {e}")
            return
        self.pending.append(str(path))
        self.say(f"(image attached to the next message: {path})")

    def save(self, arg: str) -> None:
        if not arg:
            self.say("error: /save needs a file name, e.g. /save chat.json")
            return
        try:
            Path(arg).expanduser().write_text(json.dumps({"messages": self.history}, indent=2) + "\n",
                                              encoding="utf-8")
        except OSError as e:
            self.say(f"error: cannot write {arg!r}: {e}")
            return
        self.say(f"(saved {len(self.history)} messages to {arg})")

    def turn(self, text: str) -> None:
        """Stream the answer to one user message; a failed or interrupted answer is not kept."""
        user = {"role": "user", "content": [{"type": "image", "image": p} for p in self.pending]
                + [{"type": "text", "text": text}]}
        pieces: list[str] = []
        try:
            with contextlib.closing(stream_reply(self.model, self.processor, self.history + [user],
                                                 **self.sampling)) as reply:
                for piece in reply:
                    pieces.append(piece)
                    self.say(piece, end="")
        except InterleafError as e:
            self.say(f"\nerror: {e}")
            return
        except KeyboardInterrupt:  # Ctrl-C stops this answer (its generation is cancelled), not the chat
            self.say("\n(answer interrupted; it is not kept in the conversation)")
            return
        finally:
            self.pending.clear()
        self.say()
        self.history += [user, {"role": "assistant", "content": "".join(pieces)}]
