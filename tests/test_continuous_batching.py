"""Continuous batching: requests join a running batch at random decoding steps and leave it when done,
and every greedy answer is still ``model.generate``'s on that request alone; a seeded sampled request
is its own replay alone. Both fusion families, with 0-2 images, prompts of different lengths, ``n`` > 1,
streamed and not, and the any-resolution models whose image lengths depend on the image."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoConfig
from helpers.serving import (ANYRES, FAMILIES, MODEL_NAME, answers_of, data_url, png, reference, start_server,
                             tiny_model, to_processor_messages)
from tiny import LM_FAMILIES, set_gates

import interleaf
from interleaf.serving.memory import CacheSizes

HANG_GUARD_S = 120  # a bound on how long anything may take before the test calls it a hang

# (words, images, max_tokens, n, stream)
CASES = [
    ("Describe everything you see here, please, in detail.", 1, 24, 1, True),
    ("Hi", 0, 5, 1, False),
    ("What colour is it?", 2, 9, 2, True),
    ("Tell me a long story about a river that runs to the sea " * 2, 0, 14, 1, False),
    ("Which is bigger?", 2, 3, 1, False),
    ("Name it.", 1, 11, 3, True),
    ("Count the shapes and then count them again.", 1, 7, 1, False),
]


def body_of(k: int, words: str, images: int, max_tokens: int, n: int, stream: bool) -> dict:
    pictures = [{"type": "image_url", "image_url": {"url": data_url(png(((50 * k) % 256, 30 * j, 120),
                                                                         (18 + 7 * k + 5 * j, 14 + 3 * k)))}}
                for j in range(images)]
    content = [*pictures, {"type": "text", "text": words}] if images else words
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "n": n, "stream": stream}


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S  # a hang guard, not a speed requirement
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def joining_at_random_steps(server, bodies: list[dict], seed: int) -> tuple[dict[int, list[str]], list[int]]:
    """Send ``bodies[0]``, then each other request during the hook of a random decoding step (0-9), so that it
    joins the running batch at the next step: each request's answers, and how many rows ran at each join."""
    batcher = server.app.state.batcher
    rng = random.Random(seed)
    plan: dict[int, list[int]] = {}
    for k in range(1, len(bodies)):
        plan.setdefault(rng.randrange(0, 10), []).append(k)
    futures: dict[int, object] = {}
    running_at_join: list[int] = []
    with ThreadPoolExecutor(len(bodies)) as pool:

        def send(k: int) -> None:
            before = batcher.pending + batcher.active_rows + sum(f.done() for f in futures.values())
            futures[k] = pool.submit(post, server.url, bodies[k])
            # the request is queued (or already answered) before the step runs: it joins at the next one
            wait_until(lambda: batcher.pending + batcher.active_rows + sum(f.done() for f in futures.values())
                       > before or futures[k].done(), f"request {k} is queued")

        lock = threading.Lock()

        def hook(jobs) -> None:
            with lock:
                for k in plan.pop(batcher.steps_run, []):
                    running_at_join.append(batcher.active_rows)
                    send(k)

        batcher.step_hook = hook
        try:
            futures[0] = pool.submit(post, server.url, bodies[0])
            wait_until(lambda: futures[0].done() or not plan, "every request is sent")
            with lock:  # the batch ran dry before their step: send them now
                for k in [k for ks in plan.values() for k in ks]:
                    send(k)
                plan.clear()
            wait_until(lambda: len(futures) == len(bodies), "every request is sent")
            return {k: answers_of(futures[k].result(), bodies[k]) for k in range(len(bodies))}, running_at_join
        finally:
            batcher.step_hook = None


@pytest.mark.parametrize("family", FAMILIES + ANYRES)
def test_requests_joining_and_leaving_at_random_steps_get_generate_alone(family):
    model, processor = tiny_model(family)
    bodies = [body_of(k, *case) for k, case in enumerate(CASES)]
    seeded = {**body_of(99, "Say something surprising.", 1, 8, 2, False), "temperature": 0.9, "top_p": 0.9,
              "seed": 5}
    bodies.append(seeded)
    expected = [[reference(model, processor, b["messages"], b["max_tokens"])] * b["n"] for b in bodies[:-1]]
    server = start_server(model, processor, max_batch_size=16, max_queue=64)
    batcher = server.app.state.batcher
    answers, running_at_join = joining_at_random_steps(server, bodies, seed=sum(map(ord, family)))
    try:
        for k, want in enumerate(expected):
            assert answers[k] == want, (k, bodies[k]["messages"])
        # the seeded request replayed alone gives the same answer it gave inside the running batch
        assert answers_of(post(server.url, seeded), seeded) == answers[len(bodies) - 1]
        assert sum(1 for rows in running_at_join if rows > 0) >= 3, running_at_join  # most joined a running batch
        wait_until(lambda: batcher.active_rows == 0, "every row leaves the batch")
    finally:
        server.stop()


def test_admission_by_cache_memory_waits_for_room_and_refuses_what_never_fits():
    """With a cache budget that holds one request's KV cache but not two, two concurrent requests run one after
    the other (both answered as alone); a request whose caches alone exceed the budget gets a 400."""
    model, processor = tiny_model("tiny-random")
    body = body_of(0, "Tell me about rivers.", 0, 12, 1, False)
    inputs = processor([to_processor_messages(body["messages"])])
    length = int(inputs["attention_mask"][0].sum())
    need = CacheSizes(model).kv_per_position * (length + body["max_tokens"])  # one row at its longest
    server = start_server(model, processor, max_batch_size=8, max_cache_bytes=int(need * 1.5))
    batcher = server.app.state.batcher
    held = []  # (bytes the running batch's caches hold, its rows x width) before each decoding step

    def hook(jobs) -> None:
        running = batcher._running
        if running is not None:
            held.append((running.cache_bytes(), len(running.rows) * running.width))

    batcher.step_hook = hook
    try:
        want = [reference(model, processor, body["messages"], body["max_tokens"])]
        with ThreadPoolExecutor(2) as pool:
            answers = [f.result() for f in [pool.submit(post, server.url, body) for _ in range(2)]]
        assert [answers_of(r, body) for r in answers] == [want, want]
        assert batcher.max_rows_seen == 1  # the second waited for the first one's room
        # the budget's bytes per position are what the KV cache really holds
        assert held and all(n == CacheSizes(model).kv_per_position * positions for n, positions in held), held
        too_long = post(server.url, {**body, "max_tokens": 2 * length + 40})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
        assert "cache budget" in too_long.json()["error"]["message"]
    finally:
        server.stop()


def test_compiled_decoding_steps_give_the_same_answers(fresh_dynamo):
    """``compile=True`` (``interleaf serve --compile``): decoding steps through ``torch.compile`` with dynamic
    shapes, as rows join and leave; the answers are the same tokens. (Token insertion: the quickest to compile.)"""
    model, processor = tiny_model("tiny-llava")
    bodies = [body_of(k, *CASES[k]) for k in (0, 1, 2)]
    expected = [[reference(model, processor, b["messages"], b["max_tokens"])] * b["n"] for b in bodies]
    server = start_server(model, processor, max_batch_size=16, compile=True)
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: post(server.url, b), bodies))
        assert [answers_of(r, b) for r, b in zip(answers, bodies)] == expected
        assert server.app.state.batcher.decoder is not model  # the steps did run compiled
    finally:
        server.stop()


def test_a_burst_of_prompts_is_prefilled_between_decoding_steps():
    """With ``max_prefill_tokens`` below one prompt, a burst of four requests is prefilled one request per turn,
    each turn followed by a decoding step of the running batch: a running answer keeps flowing."""
    model, processor = tiny_model("tiny-random")
    long = body_of(0, *CASES[0])
    burst = [body_of(k, *CASES[k]) for k in (1, 3, 4, 6)]
    server = start_server(model, processor, max_batch_size=16, max_prefill_tokens=1)
    batcher = server.app.state.batcher
    seen: set[int] = set()
    prefilled_at: list[int] = []  # the decoding steps run before each newcomer's prefill

    with ThreadPoolExecutor(len(burst) + 1) as pool:
        futures = []

        def hook(jobs) -> None:
            new = [j for j in jobs if id(j) not in seen]
            seen.update(id(j) for j in jobs)
            if new and futures:
                prefilled_at.append(batcher.steps_run)
            if batcher.steps_run == 2 and not futures:  # the long answer runs: the burst arrives at once
                futures.extend(pool.submit(post, server.url, b) for b in burst)
                wait_until(lambda: batcher.pending == len(burst), "the burst is queued")

        batcher.step_hook = hook
        try:
            first = pool.submit(post, server.url, long)
            wait_until(lambda: len(futures) == len(burst), "the burst is sent")
            answers = [f.result() for f in [first, *futures]]
        finally:
            batcher.step_hook = None
    try:
        for r, body in zip(answers, [long, *burst]):
            want = reference(model, processor, body["messages"], body["max_tokens"])
            assert answers_of(r, body) == [want] * body["n"]
        assert len(prefilled_at) == len(burst) and prefilled_at == sorted(set(prefilled_at)), prefilled_at
        assert batcher.prefills_run == 1 + len(burst)
    finally:
        server.stop()


@pytest.mark.parametrize("lm", ["mistral", "gpt2", "opt", "gpt_neox", "gemma", "phi3", "qwen2"])
def test_every_lm_family_joins_a_running_batch(lm):
    """Rows join and leave a running batch whatever LM the model wraps: its own position scheme (rotary,
    learned absolute, OPT's offset positions) and its own cache layers; Mistral's with a sliding window of 6
    positions, shorter than the prompts, so that the window's positions are cut while rows join."""
    data = dict(LM_FAMILIES[lm])
    model_type = data.pop("model_type")
    extra = {"sliding_window": 6} if lm == "mistral" else {}
    model, processor = interleaf.build("tiny-random", lm=AutoConfig.for_model(model_type, vocab_size=512, **data,
                                                                             **extra), seed=0)
    set_gates(model, 1.0)
    bodies = [body_of(k, *case) for k, case in enumerate(CASES)]
    expected = [[reference(model, processor, b["messages"], b["max_tokens"])] * b["n"] for b in bodies]
    server = start_server(model, processor, max_batch_size=16, max_queue=64)
    try:
        answers, running_at_join = joining_at_random_steps(server, bodies, seed=sum(map(ord, lm)))
        assert [answers[k] for k in range(len(bodies))] == expected
        assert sum(1 for rows in running_at_join if rows > 0) >= 3, running_at_join
    finally:
        server.stop()
