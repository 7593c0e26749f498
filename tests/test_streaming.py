"""Streaming generation owns its thread: the consumer going away cancels generation and joins it."""

from __future__ import annotations

import contextlib
import io
import threading

import pytest
from PIL import Image

import interleaf
from interleaf.generation import generate_text, generation_kwargs, stream_generate
from interleaf.serving.chat_repl import run_chat
from helpers.serving import FAMILIES, png


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return interleaf.build(request.param, seed=0)


def generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "interleaf-generate"]


class CountForwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *args) -> None:
        self.calls += 1


def test_closing_the_stream_cancels_generation_and_joins_its_thread(tiny):
    model, processor = tiny
    inputs = processor([["A long story:"]])
    kwargs = {**generation_kwargs(processor, max_new_tokens=300), "min_new_tokens": 300}
    counter = CountForwards(model)
    try:
        stream = stream_generate(model, processor.tokenizer, inputs, kwargs)
        first = next(stream)
        assert first and len(generate_threads()) == 1
        stream.close()  # the consumer goes away after one piece
        assert generate_threads() == []  # joined before close() returned
        assert counter.calls < 300  # cancelled at its next step, not run to its 300 tokens
    finally:
        counter.handle.remove()


def test_a_full_stream_equals_generate_and_leaves_no_thread(tiny):
    model, processor = tiny
    inputs = processor([["Once upon a time"]])
    kwargs = generation_kwargs(processor, max_new_tokens=12)
    out = model.generate(**inputs, **kwargs)
    want = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(stream_generate(model, processor.tokenizer, inputs, kwargs)) == want
    assert "".join(generate_text(model, processor, "Once upon a time", chat=False, max_new_tokens=12, stream=True)) == want
    assert generate_threads() == []


def test_an_error_in_generate_reaches_the_consumer_and_the_thread_ends(tiny):
    model, processor = tiny
    inputs = processor([["hello"]])
    with pytest.raises(ValueError, match="num_beams"):
        list(stream_generate(model, processor.tokenizer, inputs, {"max_new_tokens": 3, "num_beams": 0}))
    assert generate_threads() == []


def test_breaking_out_of_generate_text_at_a_stop_string_stops_its_thread(tiny):
    model, processor = tiny
    full = "".join(generate_text(model, processor, "Tell me", chat=False, max_new_tokens=40))
    stop = full[3:5]
    assert len(stop) == 2
    pieces = generate_text(model, processor, "Tell me", chat=False, max_new_tokens=40, stream=True, stop=[stop])
    with contextlib.closing(pieces):
        assert "".join(pieces) == full[: full.find(stop)]
    assert generate_threads() == []


class InterruptOnce(io.StringIO):
    """An output that raises KeyboardInterrupt (Ctrl-C) the first time an answer piece is printed."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def write(self, text: str) -> int:
        if self.armed and text and not text.startswith(("\n", "(", "you>", "error")) and "\n" not in text:
            self.armed = False
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_in_the_chat_stops_that_answer_only(tiny):
    model, processor = tiny
    lines = iter(["first question", "second question", "/quit"])
    out = InterruptOnce()
    history = run_chat(model, processor, input_fn=lambda prompt: next(lines), out=out, max_new_tokens=50)
    assert "(answer interrupted" in out.getvalue()
    assert generate_threads() == []
    # the interrupted turn is not kept; the next one is answered in full
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"][-1]["text"] == "second question"


def test_a_streamed_answer_about_images_equals_generate(tiny):
    model, processor = tiny
    images = [png((200, 30, 30)), png((30, 30, 200), (30, 20))]
    inputs = processor([[*images, "What differs?"]])
    kwargs = generation_kwargs(processor, max_new_tokens=10)
    out = model.generate(**inputs, **kwargs)
    want = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(stream_generate(model, processor.tokenizer, inputs, kwargs)) == want
    for stream in (False, True):
        pieces = generate_text(model, processor, "What differs?", images=images, chat=False, max_new_tokens=10,
                               stream=stream)
        assert "".join(pieces) == want
    assert generate_threads() == []


def test_a_chat_turn_with_an_image_answers_the_whole_history(tiny, tmp_path):
    model, processor = tiny
    png((200, 100, 0)).save(tmp_path / "photo.png")
    lines = iter([f"/image {tmp_path / 'photo.png'}", "What is in this picture?", "Tell me more.", "/quit"])
    history = run_chat(model, processor, input_fn=lambda prompt: next(lines), out=io.StringIO(), max_new_tokens=6)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"][0]["type"] == "image"
    for turn in (1, 3):
        messages = [{**m, "content": [{**p, "image": Image.open(p["image"])} if p["type"] == "image" else p
                                      for p in m["content"]]} if isinstance(m["content"], list) else m
                    for m in history[:turn]]
        inputs = processor([messages])
        out = model.generate(**inputs, **generation_kwargs(processor, max_new_tokens=6))
        assert history[turn]["content"] == processor.decode(out[0, inputs["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)
    assert generate_threads() == []
