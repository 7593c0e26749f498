"""Text in, text out: one prompt with images to an answer, optionally streamed.

Shared by the command line, the chat REPL and the server so they build prompts the same way. The
one stop-string rule lives here too (:func:`split_at_stop`: the earliest occurrence of any stop
string ends the text and is not part of it); evaluation, ``generate_text`` and the server cut with it.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .errors import InputError


def build_prompt(processor, text: str, images: Sequence[Any] = (), chat: bool | None = None) -> list:
    """One prompt: the images first, then the text; as a chat turn when ``chat`` (default: if the
    tokenizer has a chat template)."""
    if not text.strip() and not images:
        raise InputError("the prompt is empty: give some text or at least one image")
    images = [Path(i) if isinstance(i, str) else i for i in images]
    if chat is None:
        chat = bool(getattr(processor.tokenizer, "chat_template", None))
    if chat:
        content = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]
    return [*images, text]


def generation_kwargs(
    processor, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
    stop: Sequence[str] = (), compile: bool = False,
) -> dict:
    """``model.generate``'s options for the processor's tokenizer: greedy when ``temperature`` is 0, the
    EOS and end-of-chunk ids, stop strings; ``compile``: a static KV cache and a compiled decoding step."""
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=num_beams)
    if compile:
        kwargs["compile"] = True
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    tok = processor.tokenizer
    kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    chunk = getattr(processor, "end_of_chunk_token_id", None)
    if chunk is not None:
        eos.append(chunk)
    if eos:
        kwargs["eos_token_id"] = eos
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tok)
    return kwargs


def generate_text(
    model, processor, text: str, *, images: Sequence[Any] = (), max_new_tokens: int = 64,
    temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1, seed: int | None = None,
    chat: bool | None = None, stream: bool = False, stop: Sequence[str] = (), compile: bool = False,
) -> Iterator[str]:
    """Yield the answer to ``text`` about ``images`` (pieces as they come when ``stream``); ``compile``:
    a static KV cache and a compiled decoding step (the first call compiles)."""
    prompt = build_prompt(processor, text, images, chat)
    inputs = processor([prompt])
    kwargs = generation_kwargs(
        processor, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_beams=num_beams,
        stop=stop, compile=compile,
    )
    if seed is not None:
        torch.manual_seed(seed)
    if not stream or num_beams > 1:
        out = model.generate(**inputs, **kwargs)
        text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        yield cut_at_stop(text, stop)
        return
    cutter = StopCutter(stop)
    with contextlib.closing(stream_generate(model, processor.tokenizer, inputs, kwargs)) as pieces:
        for piece in pieces:
            text, done = cutter.feed(piece)
            if text:
                yield text
            if done:
                return  # leaving the block cancels generation and waits for its thread
    text, _ = cutter.feed("", final=True)
    if text:
        yield text


class _Cancelled(StoppingCriteria):
    """Stops every row of a ``generate`` call once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model, tokenizer, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Iterator[str]:
    """``model.generate(**inputs, **kwargs)`` in a thread this generator owns; yields the new text as it comes.

    The thread lives exactly as long as the iteration: when the consumer stops early (``close()``,
    ``break`` inside ``contextlib.closing``, an exception, garbage collection), generation is
    cancelled at its next decoding step and the thread is joined before control returns. An
    exception raised by ``generate`` is raised here, in the consumer's thread.
    """
    cancel = threading.Event()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(kwargs)
    stopping = StoppingCriteriaList([*(kwargs.pop("stopping_criteria", None) or []), _Cancelled(cancel)])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**inputs, **kwargs, streamer=streamer, stopping_criteria=stopping)
        except BaseException as e:  # noqa: BLE001 (raised again in the consumer's thread)
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, name="interleaf-generate", daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
        if errors:
            raise errors[0]
    finally:
        cancel.set()
        thread.join()


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Where the earliest occurrence of any non-empty stop string begins in ``text``; -1 if none."""
    hits = [at for at in (text.find(s) for s in stop if s) if at >= 0]
    return min(hits, default=-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string, which is not included (OpenAI's rule)."""
    at = find_stop(text, stop)
    return text if at < 0 else text[:at]


def split_at_stop(text: str, stop: Sequence[str], final: bool = False) -> tuple[str, bool]:
    """(the part of ``text`` that is final, whether a stop string ended it), for text that may still grow.

    A stop string in ``text`` cuts it at its earliest occurrence (see :func:`cut_at_stop`). Otherwise,
    unless ``final``, the longest end of ``text`` that could still become a stop string is held back.
    """
    at = find_stop(text, stop)
    if at >= 0:
        return text[:at], True
    if final:
        return text, False
    return text[: len(text) - _stop_prefix(text, stop)], False


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of a stop string."""
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


class StopCutter:
    """Cut text that arrives in pieces at the earliest stop string, which is not returned (OpenAI's rule).

    Text that could still become the start of a stop string is held back until it cannot
    (:func:`split_at_stop`).
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.held = ""

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        text = self.held + piece
        out, stopped = split_at_stop(text, self.stop, final)
        self.held = "" if stopped or final else text[len(out):]
        return out, stopped
