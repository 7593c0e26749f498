"""The chat service without HTTP: parsing, limits, prompt building, job submission and the answer's shape."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

import interleaf
from interleaf.serving import ServeLimits, URLPolicy
from interleaf.serving.batcher import Batcher
from interleaf.serving.jobs import ServerClosed
from interleaf.serving.service import Answer, APIError, ChatService, ChunkStream, job_error


@pytest.fixture(scope="module")
def service():
    _, processor = interleaf.build("tiny-random", seed=0)
    batcher = Batcher(object(), processor, max_batch_size=2)  # never started: no model call happens here
    limits = ServeLimits(max_images=2, max_prompt_tokens=200, max_completion_tokens=16, max_n=3)
    return ChatService(processor, batcher, "tiny", limits, URLPolicy(), threading.Lock())


def data_url(size=(16, 12)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request(**fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def refused(call, *args) -> APIError:
    with pytest.raises(APIError) as e:
        call(*args)
    return e.value


def test_parse_and_check_refuse_with_openai_fields(service):
    assert refused(service.parse, b"{").code == "invalid_json"
    assert refused(service.parse, b"[1]").message == "the body must be a JSON object"
    assert refused(service.parse, request(n=0)).param == "n"
    req = service.parse(request(stop=["a", "b"], max_tokens=4))
    service.check(req)
    for fields, status, param, code in [
        ({"model": "other"}, 404, "model", "model_not_found"),
        ({"n": 4}, 400, "n", None),
        ({"stop": ["a", ""]}, 400, "stop", None),
        ({"max_tokens": 17}, 400, "max_tokens", None),
        ({"max_completion_tokens": 17}, 400, "max_completion_tokens", None),
    ]:
        e = refused(service.check, service.parse(request(**fields)))
        assert (e.status, e.param, e.code) == (status, param, code), fields


def test_prepare_builds_ids_pixels_and_the_token_budget(service):
    content = [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "what?"}]
    prepared = service.prepare(service.parse(request(messages=[{"role": "user", "content": content}])))
    assert prepared.input_ids.count(service.processor.image_token_id) == 1
    assert prepared.pixel_values.shape[0] == 1 and prepared.max_new_tokens == 16
    assert service.prepare(service.parse(request(max_tokens=3))).max_new_tokens == 3
    too_many = [{"type": "image_url", "image_url": {"url": data_url()}}] * 3
    for content, code in [(too_many, "too_many_images"), ([{"type": "audio"}], "invalid_content_part"),
                          ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "invalid_image"),
                          ("word " * 100, "context_length_exceeded"),  # over the server's limit
                          ("word " * 300, None)]:  # over the model's context: the processor refuses it
        e = refused(service.prepare, service.parse(request(messages=[{"role": "user", "content": content}])))
        assert (e.status, e.code) == (400, code)


@pytest.mark.parametrize("family", ["tiny-random", "tiny-llava"])
def test_prepare_gives_each_image_its_pixels_in_either_family(family):
    """Cross-attention writes one <image> per image, LLaVA's format one per vision token: either way the
    job carries one picture per image of the request."""
    _, processor = interleaf.build(family, seed=0)
    service = ChatService(processor, Batcher(object(), processor), "tiny", ServeLimits(), URLPolicy(),
                          threading.Lock())
    image = {"type": "image_url", "image_url": {"url": data_url()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "and"}, image]},
                {"role": "assistant", "content": "two"}, {"role": "user", "content": [image, {"type": "text", "text": "?"}]}]
    prepared = service.prepare(service.parse(request(messages=messages)))
    assert prepared.pixel_values.shape[0] == 3
    per_image = processor.format.image_token_count()
    assert per_image == (1 if family == "tiny-random" else 16)
    assert prepared.input_ids.count(processor.image_token_id) == 3 * per_image
    assert service.prepare(service.parse(request())).pixel_values is None


def test_submit_maps_the_batchers_refusals(service):
    req = service.parse(request(n=3))
    prepared = service.prepare(req)
    assert refused(service.submit, req, prepared, print).param == "n"  # more rows than the batch holds
    e = refused(service.submit, service.parse(request()), prepared, print)
    assert (e.status, e.code) == (503, "worker_unavailable")  # the worker was never started
    ok, body = service.health()
    assert not ok and body["status"] == "unavailable" and "not been started" in body["reason"]
    assert service.model_entry()["id"] == "tiny" and refused(service.model_entry, "other").status == 404


def test_answer_and_chunks_shape_the_events():
    answer = Answer(2)
    for event in [("delta", 0, "he"), ("delta", 1, "yo"), ("delta", 0, "y"), ("finish", 1, "stop", 2),
                  ("finish", 0, "length", 3)]:
        assert not answer.complete
        answer.add(event)
    body = answer.body("tiny", 5)
    assert answer.complete and body["object"] == "chat.completion"
    assert [c["message"]["content"] for c in body["choices"]] == ["hey", "yo"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    with pytest.raises(APIError) as e:
        answer.add(("error", ServerClosed("the server is shutting down")))
    assert (e.value.status, e.value.code) == (503, "shutting_down")

    chunks = ChunkStream(1, "tiny", 5, include_usage=True)
    assert chunks.opening()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks.on(("delta", 0, "hi"))["choices"][0]["delta"] == {"content": "hi"}
    assert chunks.on(("finish", 0, "stop", 1))["choices"][0]["finish_reason"] == "stop" and chunks.complete
    assert chunks.closing()[0]["usage"]["completion_tokens"] == 1
    failing = ChunkStream(2, "tiny", 5, include_usage=False)
    assert failing.on(("error", RuntimeError("boom")))["error"]["code"] == "generation_failed"
    assert failing.complete and failing.closing() == []
    assert job_error(ValueError("x")).status == 500
