"""Property: the chat route answers 200 or a 4xx in OpenAI's error shape, never a 500 and never hangs.

Random JSON bodies, raw bytes, and near-valid requests whose fields and content parts take
random values (images: every format, truncated or damaged, as data URLs), posted to
``/v1/chat/completions`` through FastAPI's test client. The server caps answers at 3 tokens.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

import interleaf
from fuzz_profiles import examples, sandbox, timeout  # noqa: F401 (sandbox: a fixture)
from interleaf.serving import create_app
from interleaf.serving.limits import ServeLimits

pytestmark = pytest.mark.slow

MODEL = "tiny"
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]


@pytest.fixture(scope="module")
def client():
    model, processor = interleaf.build("tiny-random", seed=0)
    limits = ServeLimits(max_completion_tokens=3, max_n=2, max_images=3, max_body_bytes=200_000)
    with TestClient(create_app(model, processor, model_name=MODEL, limits=limits, max_batch_size=4)) as c:
        yield c


def _encoded(fmt: str, size=(20, 16), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = {fmt: _encoded(fmt) for fmt in FORMATS}


def _url(data: bytes, subtype: str = "png") -> str:
    return f"data:image/{subtype};base64," + base64.b64encode(data).decode()


def check_answer(response, stream: bool) -> None:
    """200 with a completion (or a stream ending in [DONE]), or a 4xx with OpenAI's error object."""
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"].strip() and isinstance(error["type"], str)
        return
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        assert '"error"' not in response.text, response.text[-300:]
    else:
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"], body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def image_urls(draw) -> str:
    data = bytearray(IMAGES[draw(st.sampled_from(FORMATS))])
    damage = draw(st.sampled_from(["none", "truncate", "flip", "random"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, 2**20)) % len(data)]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 2**20)) % len(data)] ^= draw(st.integers(1, 255))
    elif damage == "random":
        data = bytearray(draw(st.binary(max_size=40)))
    return draw(st.sampled_from([_url(bytes(data)), _url(bytes(data), "jpeg"), "data:image/png;base64,@@",
                                 "http://127.0.0.1/x.png", "file:///etc/passwd", "/etc/passwd", ""]))


parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | json_values}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_urls()})}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_urls() | json_values}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", "input_text"]) | json_values}),
    json_values,
)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_values},
    optional={"content": st.text(max_size=40) | st.lists(parts, max_size=4) | json_values, "name": json_values},
)
requests = st.fixed_dictionaries(
    {"model": st.just(MODEL) | json_values, "messages": st.lists(messages, max_size=4) | json_values},
    optional={
        "max_tokens": st.integers(1, 3) | json_values,
        "max_completion_tokens": st.integers(1, 3) | json_values,
        "temperature": st.floats(0, 2) | json_values,
        "top_p": st.floats(0, 1) | json_values,
        "n": st.integers(1, 2) | json_values,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | json_values,
        "seed": st.integers() | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values,
        "logprobs": st.booleans() | json_values,
        "top_logprobs": st.integers(-1, 21) | json_values,
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "yaml"])}) | json_values,
        "user": json_values,
        "tools": json_values,
        "frequency_penalty": json_values,
        "top_k": json_values,
    },
)


valid_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_urls()})}),
)
near_valid = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": st.integers(1, 3), "messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "system", "developer"]),
        "content": st.text(max_size=40) | st.lists(valid_parts, min_size=1, max_size=3)}), min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "n": st.integers(1, 2), "temperature": st.floats(0, 2),
              "top_p": st.floats(0, 1), "seed": st.integers(),
              "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
              "logprobs": st.just(True), "top_logprobs": st.integers(0, 20),
              "response_format": st.just({"type": "text"})},
)


@timeout(100, 2.0)
@settings(max_examples=examples(100))
@given(body=near_valid | requests | json_values, raw=st.none() | st.binary(max_size=40))
def test_chat_route_answers_200_or_a_4xx_in_openai_shape(client, sandbox, body, raw):
    content = raw if raw is not None else json.dumps(body).encode()
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    stream = isinstance(body, dict) and body.get("stream") is True and raw is None
    code = response.json()["error"]["code"] if 400 <= response.status_code < 500 else ""
    event(f"status {response.status_code} {code or ''}".strip())  # the shares: --hypothesis-show-statistics
    check_answer(response, stream)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_images_are_a_400_naming_the_part(client, fmt):
    data = IMAGES[fmt]
    for cut in (16, len(data) // 2):
        body = {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                         {"type": "image_url", "image_url": {"url": _url(data[:cut])}}]}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[1].image_url"
        assert error["message"].startswith("messages[0].content[1]: the data URL") and "corrupt" in error["message"]
    whole = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(data)}}]}]}
    assert client.post("/v1/chat/completions", json=whole).status_code == 200


@pytest.mark.parametrize("sampling, status", [
    ({"temperature": 5e-324}, 200),  # greedy: dividing the logits by it would overflow
    ({"temperature": 1e-300, "top_p": 5e-324}, 200),
    ({"temperature": 2.0, "seed": 2**64 - 1}, 200),
    ({"temperature": 1.0, "seed": -(2**63)}, 200),
    ({"temperature": 2.0, "seed": 2**64}, 400),  # beyond what torch.manual_seed takes
    ({"temperature": 1.0, "seed": -(2**70)}, 400),
])
def test_extreme_sampling_values_answer_200_or_400_never_500(client, sampling, status):
    body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], **sampling}
    response = client.post("/v1/chat/completions", json=body)
    check_answer(response, stream=False)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["param"] == "seed"
