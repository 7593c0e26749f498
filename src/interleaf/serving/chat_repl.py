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
    out = out or sys.stdout

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    history: list[dict] = []
    pending: list[str] = []
    say(f"interleaf chat. {HELP}")
    if seed is not None:
        torch.manual_seed(seed)
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            say()
            break
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            history.clear()
            pending.clear()
            say("(conversation cleared)")
            continue
        if command == "/image":
            if not arg:
                say("error: /image needs a path, e.g. /image photo.jpg")
                continue
            path = Path(arg).expanduser().resolve()
            try:
                load_image(path, where=f"/image {arg}", max_pixels=processor.max_pixels)
            except InterleafError as e:
                say(f"error: {e}")
                continue
            pending.append(str(path))
            say(f"(image attached to the next message: {path})")
            continue
        if command == "/save":
            if not arg:
                say("error: /save needs a file name, e.g. /save chat.json")
                continue
            try:
                Path(arg).expanduser().write_text(json.dumps({"messages": history}, indent=2) + "\n", encoding="utf-8")
            except OSError as e:
                say(f"error: cannot write {arg!r}: {e}")
                continue
            say(f"(saved {len(history)} messages to {arg})")
            continue
        if command.startswith("/"):
            say(f"error: unknown command {command!r}; {HELP}")
            continue
        user = {"role": "user", "content": [{"type": "image", "image": p} for p in pending]
                + [{"type": "text", "text": line}]}
        pieces: list[str] = []
        try:
            with contextlib.closing(stream_reply(model, processor, history + [user], max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_p=top_p)) as reply:
                for piece in reply:
                    pieces.append(piece)
                    say(piece, end="")
        except InterleafError as e:
            say(f"\nerror: {e}")
            pending.clear()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer (its generation is cancelled), not the chat
            say("\n(answer interrupted; it is not kept in the conversation)")
            pending.clear()
            continue
        say()
        pending.clear()
        history += [user, {"role": "assistant", "content": "".join(pieces)}]
    return history
