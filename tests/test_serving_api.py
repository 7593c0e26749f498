"""The OpenAI-compatible server, live on a loopback port, driven by the official ``openai`` client."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from interleaf.serving import ServeLimits
from helpers.serving import FAMILIES, MODEL_NAME, data_url, png, reference, served_with_client, start_server, tiny_model


@pytest.fixture(scope="module", params=FAMILIES)
def served(request):
    yield from served_with_client(request.param)


def ask(client, messages, max_tokens=12, **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def test_plain_answer_equals_generate_alone(served):
    model, processor, _, client = served
    messages = [{"role": "user", "content": "Describe the weather today."}]
    r = ask(client, messages, max_tokens=16)
    expected = reference(model, processor, messages, 16)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    prompt_len = int(processor([messages])["attention_mask"].sum())
    assert r.usage.prompt_tokens == prompt_len
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 16 else "stop")


def test_streamed_answer_arrives_in_chunks_and_equals_generate(served):
    model, processor, _, client = served
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(ask(client, messages, max_tokens=14, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # token by token, not one block
    assert "".join(pieces) == reference(model, processor, messages, 14)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.prompt_tokens == int(processor([messages])["attention_mask"].sum())


def test_image_as_data_url(served):
    model, processor, _, client = served
    answers = []
    for color in [(250, 20, 20), (20, 20, 250)]:
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png(color))}},
            {"type": "text", "text": "What is in the picture?"},
        ]}]
        r = ask(client, messages, max_tokens=10)
        assert r.choices[0].message.content == reference(model, processor, messages, 10)
        answers.append(r.choices[0].message.content)
    assert answers[0] != answers[1]  # the image reached the model


def test_conversation_over_several_turns(served):
    model, processor, _, client = served
    messages: list[dict] = [{"role": "system", "content": "You are terse."}]
    turns = [
        [{"type": "image_url", "image_url": {"url": data_url(png((10, 200, 10)))}}, {"type": "text", "text": "What colour?"}],
        "And the shape?",
        [{"type": "text", "text": "Compare with this one."}, {"type": "image_url", "image_url": {"url": data_url(png((200, 200, 10)))}}],
    ]
    for content in turns:
        messages.append({"role": "user", "content": content})
        r = ask(client, messages, max_tokens=8)
        answer = r.choices[0].message.content
        assert answer == reference(model, processor, messages, 8)
        messages.append({"role": "assistant", "content": answer})
    assert r.usage.prompt_tokens == int(processor([messages[:-1]])["attention_mask"].sum())


def test_n_choices_and_stop_strings(served):
    model, processor, _, client = served
    messages = [{"role": "user", "content": "List three fruits."}]
    full = reference(model, processor, messages, 20)
    r = ask(client, messages, max_tokens=20, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == full for c in r.choices)
    assert r.usage.completion_tokens == 2 * ask(client, messages, max_tokens=20).usage.completion_tokens
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    cut = full[: full.find(stop)]
    for stops in (stop, [stop, "\u2603never"]):
        r = ask(client, messages, max_tokens=20, stop=stops)
        assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = ask(client, messages, max_tokens=20, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_seeded_sampling_is_reproducible(served):
    _, _, _, client = served
    messages = [{"role": "user", "content": "Say something random."}]
    answers = [
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=1.0,
                                       top_p=0.9, seed=seed).choices[0].message.content
        for seed in (1234, 1234, 99)
    ]
    assert answers[0] == answers[1] and answers[0]
    assert answers[2] != answers[0]  # the seed, not a fixed state, decides


def test_models_health_and_playground(served):
    _, _, server, client = served
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "interleaf playground" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200


def test_a_long_answer_does_not_hold_up_a_new_request(served):
    """A short request that arrives while a 300-token answer runs is answered long before that answer ends.

    Deterministic: the long answer's second round waits until the short request is queued; the
    short request then runs its one round right after the long answer's second or third, of 75."""
    model, processor, server, client = served
    batcher = server.app.state.batcher
    long_rounds, short_rounds = [], []  # the long answer's model calls so far, at each call

    def hook(jobs) -> None:
        if any(j.max_new_tokens == 3 for j in jobs):
            short_rounds.append(len(long_rounds))  # how many rounds the long answer had run by then
        if any(j.max_new_tokens == 300 for j in jobs):
            long_rounds.append(len(long_rounds))
            if len(long_rounds) == 2:
                wait_for(lambda: any(j.max_new_tokens == 3 for j in batcher.jobs), "the short request is queued")

    batcher.step_hook = hook
    long_messages = [{"role": "user", "content": "Write a very long essay about rivers."}]
    reasons = []
    try:
        thread = threading.Thread(target=lambda: reasons.extend(
            c.choices[0].finish_reason for c in ask(client, long_messages, max_tokens=300, stream=True)
            if c.choices and c.choices[0].finish_reason))
        thread.start()
        wait_for(lambda: len(long_rounds) >= 1, "the long answer is running")
        short = ask(client, [{"role": "user", "content": "Hi"}], max_tokens=3)
        thread.join(120)
    finally:
        batcher.step_hook = None
    assert short.choices[0].message.content is not None
    assert reasons == ["length"], "the long request must run its full length for this test to mean anything"
    assert len(long_rounds) == 300  # a prefill (the first token) and 299 decoding steps
    # the short request is prefilled right after the long answer's second or third model call (whether it was
    # queued before or during the second), then joins it for its two decoding steps; not after its 300th
    k = short_rounds[0]
    assert k in (2, 3) and short_rounds == [k, k, k + 1], short_rounds


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a speed requirement
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


# -- errors --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=FAMILIES)
def strict(request):
    model, processor = tiny_model(request.param)
    limits = ServeLimits(max_body_bytes=60_000, max_images=2, max_image_pixels=40 * 40, max_completion_tokens=32)
    server = start_server(model, processor, api_key="s3cret-key", limits=limits)
    yield server
    server.stop()


def post(server, body, key="s3cret-key", **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + "/v1/chat/completions", content=body, headers={**headers, "Content-Type": "application/json"}, **kw)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, **kw)


def chat(content, **extra):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **extra}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("case, status, code, param, words", [
    ("malformed json", 400, "invalid_json", None, "not valid JSON"),
    ("wrong part type", 400, "invalid_content_part", "messages[0].content[0].type", "unsupported content part type 'audio'"),
    ("broken base64", 400, "invalid_image", "messages[0].content[0].image_url", "base64"),
    ("not an image", 400, "invalid_image", "messages[0].content[0].image_url", "not a recognised image"),
    ("oversized image", 400, "image_too_large", "messages[0].content[0].image_url", "pixels"),
    ("too many images", 400, "too_many_images", "messages[0].content[2]", "more than 2 images"),
    ("url when urls are off", 400, "image_urls_disabled", "messages[0].content[0].image_url", "--allow-urls"),
    ("file url", 400, "invalid_image", "messages[0].content[0].image_url", "local files"),
    ("plain path", 400, "invalid_image", "messages[0].content[0].image_url", "local files"),
    ("bad temperature", 400, None, "temperature", "temperature"),
    ("missing messages", 400, None, "messages", "messages"),
    ("too many tokens", 400, None, "max_tokens", "limit of 32"),
    ("unknown model", 404, "model_not_found", "model", "does not exist"),
    ("body too large", 413, "request_too_large", None, "limit"),
    ("wrong api key", 401, "invalid_api_key", None, "API key"),
    ("no api key", 401, "invalid_api_key", None, "API key"),
])
def test_errors_have_openai_shape_and_the_server_keeps_serving(strict, case, status, code, param, words):
    small = data_url(png((1, 2, 3), (8, 8)))
    bodies = {
        "malformed json": b'{"model": "tiny", "messages": [',
        "wrong part type": chat([{"type": "audio", "audio": "x"}]),
        "broken base64": chat([image_part("data:image/png;base64,@@@not-base64@@@")]),
        "not an image": chat([image_part("data:image/png;base64,aGVsbG8gd29ybGQ=")]),
        "oversized image": chat([image_part(data_url(png((9, 9, 9), (60, 50))))]),
        "too many images": chat([image_part(small), image_part(small), image_part(small), {"type": "text", "text": "?"}]),
        "url when urls are off": chat([image_part("http://example.com/cat.png")]),
        "file url": chat([image_part("file:///etc/passwd")]),
        "plain path": chat([image_part("/etc/passwd")]),
        "bad temperature": chat("hi", temperature=5),
        "missing messages": {"model": MODEL_NAME},
        "too many tokens": chat("hi", max_tokens=1000),
        "unknown model": {**chat("hi"), "model": "gpt-5"},
        "body too large": chat("x" * 70_000),
        "wrong api key": chat("hi"),
        "no api key": chat("hi"),
    }
    key = {"wrong api key": "s3cret-kez", "no api key": None}.get(case, "s3cret-key")
    r = post(strict, bodies[case], key=key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    ok = post(strict, chat([image_part(small), {"type": "text", "text": "and now?"}]))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_and_client_errors(strict):
    r = httpx.get(strict.url + "/v1/nothing-here")
    assert r.status_code == 404 and "unknown route" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=strict.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=strict.url + "/v1", api_key="s3cret-key", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="unsupported content part type"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices


def test_a_client_that_goes_away_mid_stream_frees_its_rows(served):
    _, _, server, _ = served
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "A very long answer, please."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    batcher = server.app.state.batcher
    cancelled = batcher.rows_cancelled
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    wait_for(lambda: httpx.get(server.url + "/health").json()["running"] == 0, "the row is dropped")
    assert batcher.rows_cancelled == cancelled + 1  # dropped, not generated to the end
