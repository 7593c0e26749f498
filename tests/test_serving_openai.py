"""The OpenAI fields clients rely on: ``logprobs`` / ``top_logprobs`` against the model's own forward pass,
``response_format``, ``max_completion_tokens``, ``stream_options.include_usage``, ``image_url.detail``,
``Retry-After`` on 429, and what happens to fields the server does not implement."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

from interleaf.generation import generation_kwargs
from helpers.serving import ANYRES, FAMILIES, MODEL_NAME, data_url, png, reference, served_with_client, start_server, \
    tiny_model, to_processor_messages


@pytest.fixture(scope="module", params=FAMILIES + ANYRES[:1])
def served(request):
    yield from served_with_client(request.param)


def picture_question(color=(200, 40, 40), size=(24, 20)) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(color, size))}},
        {"type": "text", "text": "What is in the picture?"},
    ]}]


def post(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def model_logprobs(model, processor, messages, max_new_tokens) -> tuple[list[int], torch.Tensor]:
    """The greedy answer's token ids (end token left out) and the model's log-softmax at each of them
    ``(L, V)``, from one forward pass over prompt + answer (no cache, no batching)."""
    inputs = processor([to_processor_messages(messages)])
    out = model.generate(**inputs, **generation_kwargs(processor, max_new_tokens=max_new_tokens))
    prompt = inputs["input_ids"].shape[1]
    ends = set(generation_kwargs(processor, max_new_tokens=1).get("eos_token_id", []))
    answer = [t for t in out[0, prompt:].tolist()]
    if answer and answer[-1] in ends:
        answer = answer[:-1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer], dtype=torch.long)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones((1, len(answer)), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits[0].float()
    return answer, torch.log_softmax(logits[prompt - 1: prompt - 1 + len(answer)], dim=-1)


def joined(entries) -> str:
    return b"".join(bytes(e.bytes if hasattr(e, "bytes") else e["bytes"]) for e in entries).decode("utf-8", "replace")


# -- logprobs ------------------------------------------------------------------------------

def test_logprobs_are_the_models_own_log_softmax(served):
    model, processor, _, client = served
    messages = picture_question()
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=5)
    answer, expected = model_logprobs(model, processor, messages, 8)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == processor.decode(answer, skip_special_tokens=True)
    assert len(content) == len(answer) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert joined(content) == r.choices[0].message.content
    for j, (token, entry) in enumerate(zip(answer, content)):
        assert entry.logprob == pytest.approx(expected[j, token].item(), abs=1e-5)
        assert entry.bytes == list(processor.decode([token]).encode()) or "\\x" in entry.token
        values, ids = torch.topk(expected[j], 5)
        tops = entry.top_logprobs
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert [t.logprob for t in tops] == pytest.approx(values.tolist(), abs=1e-5)
        assert tops[0].token == entry.token and tops[0].logprob == entry.logprob  # greedy: the most likely
        assert len({t.token for t in tops}) == 5


def test_streamed_logprobs_match_the_plain_answer(served):
    _, _, _, client = served
    messages = [{"role": "user", "content": "Name a colour."}]
    kw = dict(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in plain]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in plain], abs=1e-6)
    assert sum(1 for c in chunks if c.choices and c.choices[0].logprobs) > 1  # with the text, chunk by chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined(streamed) == text


def test_logprobs_report_the_models_distribution_under_sampling_and_do_not_change_the_answer(served):
    model, processor, server, _ = served
    messages = [{"role": "user", "content": "Say something random."}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "seed": 7}
    without = post(server, body).json()["choices"][0]
    sampled = post(server, {**body, "logprobs": True, "top_logprobs": 20}).json()["choices"][0]
    assert sampled["message"]["content"] == without["message"]["content"]  # the same draws
    assert without["logprobs"] is None
    # the first token's distribution depends on the prompt alone: it is the model's, not divided by the temperature
    inputs = processor([messages])
    with torch.no_grad():
        first = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
    values = torch.topk(first, 20).values.tolist()
    entry = sampled["logprobs"]["content"][0]
    assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values, abs=1e-5)
    assert (first - entry["logprob"]).abs().min().item() < 1e-5  # the drawn token's own value
    assert torch.topk(torch.log_softmax(first / 0.7, -1), 1).values.item() != pytest.approx(values[0], abs=1e-3)


def test_logprobs_for_every_choice_and_under_a_stop_string(served):
    model, processor, server, _ = served
    messages = [{"role": "user", "content": "List three fruits."}]
    full = reference(model, processor, messages, 16)
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": True}
    whole = post(server, {**body, "n": 2}).json()["choices"]
    assert [joined(c["logprobs"]["content"]) for c in whole] == [full, full]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    cut = post(server, {**body, "stop": stop}).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.find(stop)]
    entries = cut["logprobs"]["content"]
    # the tokens that make the answer: the last one holds its end, none lies wholly in the stop string
    assert joined(entries).startswith(cut["message"]["content"])
    assert not joined(entries[:-1]).startswith(cut["message"]["content"]) or not cut["message"]["content"]
    assert entries == whole[0]["logprobs"]["content"][: len(entries)]


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": "maybe"}, "logprobs"),
])
def test_bad_logprobs_requests_are_a_400_naming_the_field(served, extra, param):
    _, _, server, _ = served
    r = post(server, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


# -- response_format, the other fields -----------------------------------------------------

def test_response_format_text_is_served_and_json_formats_are_refused(served):
    model, processor, server, client = served
    messages = [{"role": "user", "content": "Give me a JSON object."}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                       response_format={"type": "text"})
    assert r.choices[0].message.content == reference(model, processor, messages, 6)
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, response_format=fmt)
        error = caught.value.body
        assert error["code"] == "unsupported_response_format" and error["param"] == "response_format.type"
        assert fmt["type"] in error["message"] and "not supported" in error["message"]
    r = post(server, {"model": MODEL_NAME, "messages": messages, "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type"


@pytest.mark.parametrize("extra, status, param", [
    ({"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True}, 200, None),
    ({"tool_choice": "auto", "tools": [], "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}, 200, None),
    ({"modalities": ["text"], "audio": None, "tool_choice": "none"}, 200, None),
    ({"top_k": 5}, 400, "top_k"),
    ({"repetition_penalty": 1.2, "best_of": 2}, 400, "best_of"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"logit_bias": {"50": 10}}, 400, "logit_bias"),
    ({"modalities": ["text", "audio"]}, 400, "modalities"),
])
def test_fields_the_server_does_not_implement_are_ignored_only_when_harmless(served, extra, status, param):
    model, processor, server, _ = served
    messages = [{"role": "user", "content": "hi"}]
    r = post(server, {"model": MODEL_NAME, "messages": messages, "max_tokens": 3, "temperature": 0, **extra})
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["choices"][0]["message"]["content"] == reference(model, processor, messages, 3)
    else:
        error = r.json()["error"]
        assert error["param"] == param and param in error["message"]
        assert error["code"] in ("unknown_parameter", "unsupported_parameter")


def test_unknown_fields_sent_by_the_official_client_are_refused(served):
    _, _, _, client = served
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"top_k": 3})


def test_image_detail_is_accepted_and_changes_nothing(served):
    model, processor, server, client = served
    messages = picture_question((30, 160, 60))
    expected = reference(model, processor, messages, 6)
    for detail in ("auto", "low", "high", "original"):
        messages[0]["content"][0]["image_url"]["detail"] = detail
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == expected
    messages[0]["content"][0]["image_url"]["detail"] = "ultra"
    r = post(server, {"model": MODEL_NAME, "messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url.detail"


def test_max_completion_tokens_and_usage_in_the_last_stream_chunk(served):
    model, processor, server, client = served
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=5, temperature=0)
    assert r.choices[0].message.content == reference(model, processor, messages, 5)
    assert r.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=5,
                                                temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices
    too_many = post(server, {"model": MODEL_NAME, "messages": messages, "max_completion_tokens": 10**6})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_completion_tokens"


# -- 429 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES[:1])
def test_a_full_queue_answers_429_with_retry_after(family):
    """One request runs (held in its round), one waits in the queue of one: the next is a 429 with
    ``Retry-After``, which the official client reads as a rate limit; then all is served."""
    model, processor = tiny_model(family)
    server = start_server(model, processor, max_batch_size=1, max_queue=1)
    batcher = server.app.state.batcher
    release, running = threading.Event(), threading.Event()

    def hold(jobs) -> None:
        running.set()
        release.wait(60)

    batcher.step_hook = hold
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(post(server, body))) for _ in range(2)]
    try:
        threads[0].start()
        assert running.wait(60)
        threads[1].start()
        deadline = time.monotonic() + 60
        while batcher.pending < 1:
            assert time.monotonic() < deadline, "the second request was never queued"
            time.sleep(0.01)
        busy = post(server, body)
        assert busy.status_code == 429, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**body)
        assert caught.value.response.headers["retry-after"] == "1"
    finally:
        batcher.step_hook = None
        release.set()
        for t in threads:
            t.join(60)
        server.stop()
    assert [a.status_code for a in answers] == [200, 200]
