"""The server under faults: concurrent image requests of different lengths, a round that raises,
a worker that dies or stalls, clients that go away, and shutdown (in-process and by SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers.serving import FAMILIES, MODEL_NAME, answers_of, data_url, png, reference, start_server, tiny_model

HANG_GUARD_S = 120  # a bound on how long anything may take before the test calls it a hang


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return tiny_model(request.param)


class Gate:
    """A round hook that holds the worker inside a round until released (so requests queue up
    behind it deterministically); optionally raises for chosen jobs."""

    def __init__(self):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.fail_if = None  # callable(jobs) -> exception to raise, or None

    def __call__(self, jobs) -> None:
        self.entered.set()
        if not self.open.wait(HANG_GUARD_S):
            raise RuntimeError("the test never opened the gate")
        if self.fail_if is not None:
            error = self.fail_if(jobs)
            if error is not None:
                raise error


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S, **kw)


def image_request(i: int, n_images: int, max_tokens: int, n: int = 1) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(png(((40 * i) % 256, 200 - 20 * k, 90),
                                                                      (16 + 4 * k + i, 20 + 2 * i)))}}
               for k in range(n_images)]
    content.append({"type": "text", "text": f"Image set {i}: what do you see" + "?" * i})
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "n": n}


def assert_error_shape(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_concurrent_image_requests_of_different_lengths_get_their_own_answers(tiny):
    """Eight image requests (1-2 images, n up to 3) arrive together and finish at different steps:
    rows leave the batch one after another, each with its media cache, and every answer equals the
    request's answer alone."""
    model, processor = tiny
    lengths = [1, 3, 7, 16, 2, 24, 5, 12]
    ns = [1, 2, 1, 3, 1, 1, 2, 1]
    bodies = [image_request(i, 1 + i % 2, m, n) for i, (m, n) in enumerate(zip(lengths, ns))]
    expected = [reference(model, processor, b["messages"], b["max_tokens"]) for b in bodies]
    server = start_server(model, processor, max_batch_size=16)
    gate = Gate()
    try:
        batcher = server.app.state.batcher
        batcher.step_hook = gate
        hold = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hold"}], "max_tokens": 1,
                "temperature": 0.5}  # holds the worker in its prefill (and is done after it), ahead of the eight
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            opener = pool.submit(post, server.url, hold)
            wait_until(lambda: gate.entered.is_set() or opener.done(), "the first request holds the worker")
            assert gate.entered.is_set(), opener.result().text
            futures = [pool.submit(post, server.url, b) for b in bodies]
            wait_until(lambda: batcher.pending == len(bodies), "all eight requests are queued")
            gate.open.set()  # all eight are admitted together: one prefill of 12 rows
            answers = [f.result() for f in futures]
            assert opener.result().status_code == 200
        for body, r, want in zip(bodies, answers, expected):
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
            assert [c["message"]["content"] for c in choices] == [want] * body["n"]
        assert batcher.max_rows_seen == sum(ns)
        wait_until(lambda: batcher.active_rows == 0, "the finished rows leave the batch")
        assert batcher.health() == (True, "ok")
    finally:
        gate.open.set()
        server.stop()


def mixed_requests(model, processor) -> list[tuple[dict, str]]:
    """Requests as users mix them, each with its answer alone: with and without images (0, 1, 2), short and
    long prompts, n up to 3, stop strings, streamed and not."""
    text = lambda words, max_tokens, n=1: {  # noqa: E731
        "model": MODEL_NAME, "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
        "temperature": 0, "n": n}
    bodies = [
        text("Hi", 5),
        text("Please tell me, at some length, everything you know about rivers and lakes " * 3, 11, n=2),
        image_request(4, 1, 9),
        {**image_request(5, 2, 14), "stream": True},
        {**image_request(6, 1, 12, n=3), "stream": True},
        {**text("Count to ten.", 3), "stream": True},
        text("List three fruits.", 16),
    ]
    out = []
    for k, body in enumerate(bodies):
        full = reference(model, processor, body["messages"], body["max_tokens"])
        if k in (2, 4, 6):  # a stop string from inside the answer: the answer ends before it
            stop = next((full[i:i + 2] for i in range(2, len(full) - 2)
                         if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]), None)
            if stop is not None:
                body = {**body, "stop": [stop, "\u2603never"]}
                full = full[: full.find(stop)]
        out.append((body, full))
    return out


def test_a_batch_of_mixed_requests_gives_each_its_answer_alone(tiny):
    """Requests with and without images, of different lengths, n, stop strings and streaming, from
    concurrent clients, admitted together into one batch; each answer equals the request's answer alone."""
    model, processor = tiny
    cases = mixed_requests(model, processor)
    server = start_server(model, processor, max_batch_size=16)
    gate = Gate()
    try:
        batcher = server.app.state.batcher
        batcher.step_hook = gate
        hold = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hold"}], "max_tokens": 1,
                "temperature": 0.5}  # holds the worker in its prefill (and is done after it), ahead of the others
        with ThreadPoolExecutor(len(cases) + 1) as pool:
            opener = pool.submit(post, server.url, hold)
            wait_until(lambda: gate.entered.is_set() or opener.done(), "the first request holds the worker")
            assert gate.entered.is_set(), opener.result().text
            futures = [pool.submit(post, server.url, body) for body, _ in cases]
            wait_until(lambda: batcher.pending == len(cases), "all requests are queued")
            gate.open.set()
            responses = [f.result() for f in futures]
            assert opener.result().status_code == 200
        for (body, want), r in zip(cases, responses):
            assert answers_of(r, body) == [want] * body["n"], body
        assert batcher.max_rows_seen == sum(body["n"] for body, _ in cases)  # one batch
        wait_until(lambda: batcher.active_rows == 0, "the finished rows leave the batch")
    finally:
        gate.open.set()
        server.stop()


def test_a_prefill_that_raises_fails_only_its_requests(tiny):
    """A request whose prefill fails gets a 500; the request already running beside it is untouched."""
    model, processor = tiny
    server = start_server(model, processor, max_batch_size=16)
    batcher = server.app.state.batcher
    gate = Gate()
    poison_tokens = 13
    gate.fail_if = lambda jobs: (RuntimeError("injected failure in a prefill")
                                 if any(j.max_new_tokens == poison_tokens for j in jobs) else None)
    batcher.step_hook = gate
    try:
        poison = image_request(1, 1, poison_tokens)
        seeded = {**image_request(2, 1, 6), "temperature": 0.8, "seed": 7}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, server.url, seeded)
            wait_until(lambda: gate.entered.is_set(), "the seeded request is being prefilled")
            failing = pool.submit(post, server.url, poison)
            wait_until(lambda: batcher.pending == 1, "the poisoned request waits")
            gate.open.set()  # the seeded request runs; the poisoned one joins at its next step and fails alone
            bad, good = failing.result(), running.result()
        error = assert_error_shape(bad, 500, "generation_failed")
        assert error["type"] == "server_error" and "injected failure in a prefill" in error["message"]
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
        # the streamed form of the same failure: an error event, then the stream ends
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**poison, "stream": True},
                          timeout=HANG_GUARD_S) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert "injected failure" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        # the worker carries on: the next request gets its answer, and nothing is left running
        after = image_request(3, 2, 9)
        r = post(server.url, after)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == reference(model, processor, after["messages"], 9)
        assert batcher.steps_failed == 2 and batcher.active_rows == 0
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        gate.open.set()
        server.stop()


def test_a_decoding_step_that_raises_fails_the_running_rows_and_the_worker_goes_on(tiny):
    """A decoding step that fails after a request's rows joined fails the rows of that step (they share its
    caches), drops the batch, and the next request is served as if nothing happened."""
    model, processor = tiny
    server = start_server(model, processor, max_batch_size=16)
    batcher = server.app.state.batcher
    calls = []

    def hook(jobs):
        if any(j.max_new_tokens == 17 for j in jobs):
            calls.append(len(jobs))
            if len(calls) == 3:  # its prefill, a first decoding step, then this one
                raise RuntimeError("injected failure in a decoding step")

    batcher.step_hook = hook
    try:
        error = assert_error_shape(post(server.url, image_request(1, 2, 17, n=2)), 500, "generation_failed")
        assert "injected failure in a decoding step" in error["message"]
        assert batcher.steps_failed == 1 and batcher.active_rows == 0
        after = image_request(3, 1, 9)
        r = post(server.url, after)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == reference(model, processor, after["messages"], 9)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()


class _WorkerKiller(BaseException):
    """Not an ``Exception``: escapes the per-step guard and ends the worker thread."""


def test_a_dead_worker_answers_its_requests_and_then_503_at_once(tiny):
    model, processor = tiny
    server = start_server(model, processor)
    batcher = server.app.state.batcher

    def die(jobs):
        raise _WorkerKiller("injected: the worker thread ends")

    batcher.step_hook = die
    try:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        error = assert_error_shape(post(server.url, body), 503, "worker_unavailable")
        assert "stopped unexpectedly" in error["message"] and "injected: the worker thread ends" in error["message"]
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "stopped unexpectedly" in health.json()["reason"]
        assert_error_shape(post(server.url, body), 503, "worker_unavailable")  # refused at once, not queued
        assert batcher.pending == 0
    finally:
        assert server.stop(), "the server did not stop"


def test_a_stalled_worker_is_reported_and_recovers(tiny):
    model, processor = tiny
    server = start_server(model, processor, stall_timeout_s=0.2)
    batcher = server.app.state.batcher
    gate = Gate()
    batcher.step_hook = gate
    try:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(post, server.url, body)
            assert gate.entered.wait(HANG_GUARD_S)
            wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, "/health reports the stall")
            assert "no progress" in httpx.get(server.url + "/health").json()["reason"]
            assert_error_shape(post(server.url, body), 503, "worker_unavailable")
            gate.open.set()
            assert held.result().status_code == 200  # the held request finishes once the worker moves again
        wait_until(lambda: httpx.get(server.url + "/health").status_code == 200, "/health recovers")
        assert post(server.url, body).status_code == 200
    finally:
        gate.open.set()
        server.stop()


def test_clients_that_go_away_free_their_rows(tiny):
    model, processor = tiny
    server = start_server(model, processor)
    batcher = server.app.state.batcher
    rounds = threading.Semaphore(0)
    batcher.step_hook = lambda jobs: rounds.acquire(timeout=HANG_GUARD_S)
    try:
        body = image_request(4, 1, 64)
        # a streaming client that reads one piece, then hangs up
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=HANG_GUARD_S) as r:
            rounds.release()
            next(r.iter_lines())
        # a non-streaming client that sends its request and closes the connection without reading
        raw = json.dumps({**body, "max_tokens": 63}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            wait_until(lambda: any(job.max_new_tokens == 63 for job in batcher.jobs), "the second request is in")
        wait_until(lambda: all(job.cancelled.is_set() for job in batcher.jobs), "both clients are seen gone")
        for _ in range(64):
            rounds.release()
        wait_until(lambda: batcher.rows_cancelled == 2 and batcher.active_rows == 0 and batcher.pending == 0,
                   "both rows are dropped")
        # at most two rounds in all (not 32 each): the streamed row is dropped at the first step after its client
        # left, and the other request at its first step, or from the queue before it runs
        assert batcher.steps_run <= 2
    finally:
        for _ in range(64):
            rounds.release()
        server.stop()


def test_stop_cancels_running_work_and_answers_503(tiny):
    model, processor = tiny
    server = start_server(model, processor, shutdown_timeout_s=5)
    batcher = server.app.state.batcher
    gate = Gate()
    batcher.step_hook = gate
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 64}
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, server.url, body)
        assert gate.entered.wait(HANG_GUARD_S)
        queued = pool.submit(post, server.url, body)
        wait_until(lambda: batcher.pending == 1, "the second request waits")
        stopper = pool.submit(server.stop)
        wait_until(lambda: batcher.health()[1] == "the server is shutting down", "shutdown has begun")
        gate.open.set()
        for r in (running.result(), queued.result()):
            assert_error_shape(r, 503, "shutting_down")
        assert stopper.result() is True


SERVER_SCRIPT = r"""
import sys, threading
sys.path.insert(0, {tests!r})
from helpers.serving import tiny_model
from interleaf.serving import create_app, serve

mode = sys.argv[1]
model, processor = tiny_model()
app = create_app(model, processor, model_name="tiny", shutdown_timeout_s=2)
if mode == "stuck":
    never = threading.Event()
    app.state.batcher.step_hook = lambda jobs: never.wait()
elif mode == "dead":
    def die(jobs):
        raise SystemExit("injected: the worker thread ends")
    app.state.batcher.step_hook = die
serve(app, port=0, log_level="warning", on_started=lambda host, port: print("PORT", port, flush=True))
print("EXITED CLEANLY", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stuck", "dead"])
def test_sigterm_stops_the_server_whatever_its_worker_is_doing(tmp_path, mode):
    """A worker stuck inside a model call, or dead: SIGTERM still ends the process within its
    shutdown timeout (2 s here; the hang guard is far longer), and the waiting client gets an answer."""
    script = tmp_path / "serve_fault.py"
    script.write_text(SERVER_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        port = None
        for line in proc.stdout:
            if line.startswith("PORT "):
                port = int(line.split()[1])
                break
        assert port is not None, "the server did not start"
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, url, body)
            if mode == "stuck":
                wait_until(lambda: httpx.get(url + "/health").json()["running"] == 1, "the request is running")
            else:
                assert_error_shape(waiting.result(), 503, "worker_unavailable")
                assert httpx.get(url + "/health").status_code == 503
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(HANG_GUARD_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the server ignored SIGTERM ({mode} worker)")
            if mode == "stuck":
                try:  # the stuck request is answered 503, or its connection closed when the server exits
                    r = waiting.result()
                    assert_error_shape(r, 503)
                except httpx.TransportError:
                    pass
        output = proc.stdout.read()
        if mode == "stuck":
            assert "did not stop within the shutdown timeout" in output, output
        assert proc.returncode in (0, -signal.SIGTERM), output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_the_worker_runs_for_the_apps_lifespan_only(tiny):
    from fastapi.testclient import TestClient

    from interleaf.serving import create_app

    model, processor = tiny
    app = create_app(model, processor, model_name=MODEL_NAME)
    batcher = app.state.batcher
    assert batcher._thread is None  # creating the app starts nothing
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    outside = TestClient(app)  # no lifespan: no worker, and requests say so instead of hanging
    assert outside.get("/health").status_code == 503
    assert_error_shape(outside.post("/v1/chat/completions", json=body), 503, "worker_unavailable")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        worker = batcher._thread
    assert not worker.is_alive()  # stopped and joined at shutdown


@pytest.mark.parametrize("option", ["shutdown_timeout_s", "stall_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.5, "10", None])
def test_timeouts_are_validated_with_a_message(tiny, option, value):
    from interleaf.errors import InputError
    from interleaf.serving import create_app

    model, processor = tiny
    with pytest.raises(InputError, match=f"{option} must be a positive number of seconds, got {value!r}"):
        create_app(model, processor, **{option: value})


@pytest.mark.parametrize("option", ["max_batch_size", "max_queue", "max_prefill_tokens", "max_cache_bytes"])
@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_admission_limits_are_validated_with_a_message(tiny, option, value):
    from interleaf.errors import InputError
    from interleaf.serving import create_app

    model, processor = tiny
    with pytest.raises(InputError, match=f"{option} must be a whole number of at least 1, got {value!r}"):
        create_app(model, processor, **{option: value})
