"""A soak test of the server: 32 clients send a bounded mix of what users send at once.

Text-only and 1-4 image requests, ``n`` of 1-3, streamed and not, stop strings, ``max_tokens``
from 1 to 64, seeded sampling, clients that hang up mid-stream, and bad requests. Every good greedy
answer must equal the same request's answer alone, every seeded answer its replay alone, every bad
request its 4xx; no request may hang; afterwards nothing is left running, no batch state is alive,
the worker is healthy and the process's memory has settled.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from interleaf.serving import ServeLimits
from interleaf.serving.running import RunningBatch
from helpers.serving import MODEL_NAME, data_url, png, reference, rss_bytes, start_server, tiny_model

pytestmark = pytest.mark.slow

CLIENTS = 32
REQUESTS = 160
HANG_S = 120  # a request still unanswered after this long counts as hung
MEMORY_MARGIN = 200 * 2**20  # measured: +40-65 MiB over the first pass (allocator, thread stacks), +1-5 MiB per pass after


def cases() -> list[dict]:
    """Distinct prompts: six text-only of different lengths, eight with 1-4 images of different sizes."""
    out = [[{"role": "user", "content": f"Soak question {i}: " + "tell me more " * (3 * i)}] for i in range(6)]
    for i in range(8):
        images = [{"type": "image_url", "image_url": {"url": data_url(png(((37 * (i + k)) % 256, 60 + 20 * k, 200 - 9 * i),
                                                                           (12 + 5 * k + i, 14 + 3 * i)))}}
                  for k in range(1 + i % 4)]
        out.append([{"role": "user", "content": [*images, {"type": "text", "text": f"Picture set {i}" + "?" * i}]}])
    return out


def truncated_png_url() -> str:
    buf = io.BytesIO()
    png((10, 20, 30), (40, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()[:60]).decode()


BAD = [  # (body, expected status)
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, 400),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64"}}]}]}, 400),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": truncated_png_url()}}]}]}, 400),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}, 400),
    ({"model": MODEL_NAME}, 400),
    ("{not json", 400),
]


def plan(n_cases: int, rng: random.Random) -> list[dict]:
    """What each request of the soak is: its kind and settings (deterministic for a seed)."""
    out = []
    for i in range(REQUESTS):
        roll = rng.random()
        if roll < 0.1:
            out.append({"kind": "bad", "bad": i % len(BAD)})
        elif roll < 0.2:
            out.append({"kind": "hangup", "case": rng.randrange(n_cases), "max_tokens": 64})
        else:
            out.append({"kind": "seeded" if roll < 0.27 else "greedy", "case": rng.randrange(n_cases),
                        "max_tokens": rng.choice([1, 2, 5, 9, 16, 24, 40, 64]), "n": rng.choice([1, 1, 2, 3]),
                        "stream": rng.random() < 0.5, "stop": rng.random() < 0.3, "seed": rng.randrange(1000)})
    return out


def body_for(item: dict, messages: list[list[dict]], expected: dict) -> dict:
    body = {"model": MODEL_NAME, "messages": messages[item["case"]], "max_tokens": item["max_tokens"],
            "n": item.get("n", 1), "temperature": 0}
    if item["kind"] == "seeded":
        body.update(temperature=0.9, top_p=0.95, seed=item["seed"])
    if item.get("stop"):
        ref = expected[(item["case"], item["max_tokens"])]
        if len(ref) >= 4:
            body["stop"] = [ref[2:4]]  # a stop string inside the greedy answer
    return body


def send(client: httpx.Client, body: dict, stream: bool) -> tuple[int, list[str], list[str]]:
    """(status, texts per choice, finish reasons per choice); raises on a transport error or a hang."""
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return r.status_code, [], []
        choices = r.json()["choices"]
        return 200, [c["message"]["content"] for c in choices], [c["finish_reason"] for c in choices]
    n = body.get("n", 1)
    texts, reasons = [""] * n, [""] * n
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [], []
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    return 200, texts, reasons


@pytest.fixture(scope="module")
def soak_setup():
    model, processor = tiny_model()
    messages = cases()
    items = plan(len(messages), random.Random(0))
    expected = {}
    for item in items:
        if item["kind"] in ("greedy", "seeded", "hangup"):
            key = (item["case"], item["max_tokens"])
            if key not in expected:
                expected[key] = reference(model, processor, messages[key[0]], key[1])
    limits = ServeLimits(max_completion_tokens=64, max_n=4)
    server = start_server(model, processor, limits=limits, max_batch_size=16, max_queue=256)
    yield server, messages, items, expected
    server.stop()


def test_soak_32_clients_mixed_requests(soak_setup, capsys):
    server, messages, items, expected = soak_setup
    batcher = server.app.state.batcher
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=HANG_S)
        return local.client

    def one(i: int) -> tuple[str, str | None]:
        """(kind, problem or None) for request i."""
        item = items[i]
        try:
            if item["kind"] == "bad":
                body, status = BAD[item["bad"]]
                r = (client().post("/v1/chat/completions", content=body) if isinstance(body, str)
                     else client().post("/v1/chat/completions", json=body))
                error = r.json().get("error", {})
                ok = r.status_code == status and error.get("message")
                return "bad", None if ok else f"bad request {item['bad']}: got {r.status_code} {r.text[:200]}"
            if item["kind"] == "hangup":
                body = body_for(item, messages, expected)
                with client().stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    for k, _ in enumerate(r.iter_lines()):
                        if k >= 2:
                            break  # hang up mid-stream
                return "hangup", None
            body = body_for(item, messages, expected)
            status, texts, reasons = send(client(), body, item["stream"])
            if status != 200 or len(texts) != body["n"]:
                return item["kind"], f"request {i}: status {status}, {len(texts)} choices"
            if item["kind"] == "seeded":
                item["answer"] = texts  # checked against a replay alone below
                return "seeded", None
            want = expected[(item["case"], item["max_tokens"])]
            if "stop" in body:
                want = want[: want.find(body["stop"][0])]
            if texts != [want] * body["n"]:
                return "greedy", f"request {i}: {texts!r} != {want!r}"
            if "stop" in body and reasons != ["stop"] * body["n"]:
                return "greedy", f"request {i}: finish reasons {reasons} with a stop string"
            return "greedy", None
        except httpx.TimeoutException:
            return item["kind"], f"request {i} hung (no answer within {HANG_S} s)"

    with ThreadPoolExecutor(CLIENTS) as pool:  # warm-up: every case once, so that memory is measured warm
        list(pool.map(lambda k: client().post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": messages[k], "max_tokens": 8, "temperature": 0}), range(len(messages))))
    gc.collect()
    rss_before = rss_bytes()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    problems = [p for _, p in results if p]
    hangs = [p for p in problems if "hung" in p]
    assert not problems, problems[:5]

    # seeded sampling: each answer equals the same request replayed alone
    replay = httpx.Client(base_url=server.url, timeout=HANG_S)
    seeded = [item for item in items if item["kind"] == "seeded"]
    for item in seeded:
        body = body_for(item, messages, expected)
        assert send(replay, body, False)[1] == item["answer"], f"seeded request {item} differs alone"

    # afterwards: nothing running or queued, no batch state alive, a healthy worker, memory settled
    rounds = batcher.steps_run
    assert batcher.pending == 0
    for _ in range(HANG_S * 100):  # rows of clients that hung up leave at their next step
        if batcher.active_rows == 0:
            break
        time.sleep(0.01)
    assert batcher.active_rows == 0, f"{batcher.active_rows} rows still running after the soak"
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is RunningBatch], "batch state outlived its requests"
    health = replay.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert batcher._thread is not None and batcher._thread.is_alive()
    rss_after = rss_bytes()
    kinds = [k for k, _ in results]
    with capsys.disabled():
        print(f"\nsoak: {REQUESTS} requests from {CLIENTS} clients ({kinds.count('greedy')} greedy, "
              f"{kinds.count('seeded')} seeded, {kinds.count('hangup')} hung up, {kinds.count('bad')} bad); "
              f"wrong answers {len(problems) - len(hangs)}, hangs {len(hangs)}; rows cancelled "
              f"{batcher.rows_cancelled}; decoding steps {rounds}; largest batch {batcher.max_rows_seen} rows; "
              f"RSS {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB after")
    assert rss_after - rss_before < MEMORY_MARGIN, f"RSS grew by {(rss_after - rss_before) / 2**20:.0f} MiB"
    assert batcher.max_rows_seen > 1  # batched (a request with n > 1 alone gives several rows)
    replay.close()
