"""The server under load: concurrent clients get exactly their single-request answers, a full
queue answers 429 without harm, and memory settles afterwards; for both fusion families and for
models that tile images at any resolution (each request's images of its own sizes, batched together)."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from helpers.serving import ANYRES, FAMILIES, MODEL_NAME, data_url, png, reference, rss_bytes, start_server, tiny_model

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


def prompts() -> list[list[dict]]:
    out = [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i * 3}?" + " more" * (i % 4)}]
           for i in range(6)]
    for i, color in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220)]):
        out.append([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png(color, (16 + 4 * i, 20)))}},
            {"type": "text", "text": "Describe this image" + "!" * i},
        ]}])
    out.append([{"role": "user", "content": [  # two images, text between them
        {"type": "image_url", "image_url": {"url": data_url(png((200, 200, 30)))}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_url(png((30, 200, 200), (28, 16)))}},
        {"type": "text", "text": "which is brighter?"},
    ]}])
    return out


@pytest.fixture(scope="module", params=FAMILIES + ANYRES)
def loaded(request):
    model, processor = tiny_model(request.param)
    cases = prompts()
    expected = [reference(model, processor, m, MAX_TOKENS) for m in cases]
    server = start_server(model, processor, max_batch_size=8, max_queue=256)
    yield server, cases, expected
    server.stop()


def run_clients(url: str, cases, expected, total: int, clients: int) -> list[tuple[int, str, str]]:
    local = threading.local()

    def one(i: int) -> tuple[int, str, str]:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        k = i % len(cases)
        stream = i % 3 == 0
        kwargs = dict(model=MODEL_NAME, messages=cases[k], max_tokens=MAX_TOKENS, temperature=0)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in local.client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
        else:
            text = local.client.chat.completions.create(**kwargs).choices[0].message.content
        return k, text, expected[k]

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(total)))


def test_32_concurrent_clients_200_requests_all_correct_and_memory_settles(loaded):
    server, cases, expected = loaded
    run_clients(server.url, cases, expected, total=32, clients=32)  # warm-up
    gc.collect()
    before = rss_bytes()
    batcher = server.server.config.app.state.batcher
    rounds_before = batcher.steps_run
    results = run_clients(server.url, cases, expected, total=200, clients=32)
    wrong = [(k, got, want) for k, got, want in results if got != want]
    assert len(results) == 200 and not wrong, wrong[:3]
    assert batcher.max_rows_seen > 1  # requests really were batched together
    assert batcher.steps_run - rounds_before < 200 * 2  # far fewer rounds than one batch per request would need
    gc.collect()
    after = rss_bytes()
    assert after - before < 300 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MiB under load"
    health = httpx.get(server.url + "/health").json()
    assert health["queued"] == 0 and health["running"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_queue_answers_429_and_the_server_recovers(family):
    model, processor = tiny_model(family)
    server = start_server(model, processor, max_batch_size=1, max_queue=1)
    try:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "count slowly"}],
                "max_tokens": 40, "temperature": 0}

        def one(_: int) -> httpx.Response:
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.json()["error"]["type"] == "rate_limit_error" and busy.json()["error"]["code"] == "queue_full"
        assert busy.headers.get("retry-after")
        answers = {r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200}
        assert answers == {reference(model, processor, body["messages"], 40)}
        after = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert after.status_code == 200
    finally:
        server.stop()
