"""The server batches token-insertion models that tile images at any resolution (LLaVA-NeXT and
xGen-MM instruct): requests with 0, 1 or 2 images of different sizes and aspect ratios, different
prompt lengths, ``n`` > 1, streamed or not, run in one batch, and every greedy answer is what
``model.generate`` gives that request alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from helpers.serving import ANYRES, MODEL_NAME, data_url, png, reference, start_server, tiny_model, to_processor_messages
from interleaf.serving.rows import Row
from interleaf.serving.running import batch_images
from interleaf.serving.jobs import Job

MAX_TOKENS = 7


def image(color: tuple[int, int, int], size: tuple[int, int]) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png(color, size))}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# (messages, n, stream): image counts 0, 1, 2; wide, tall, square, small and large images (other grids)
CASES: list[tuple[list[dict], int, bool]] = [
    ([{"role": "user", "content": "Hi"}], 1, False),
    ([{"role": "system", "content": "You answer in one long sentence."},
      {"role": "user", "content": "What is the capital of a country with many rivers and lakes?"}], 2, True),
    ([{"role": "user", "content": [image((220, 30, 30), (48, 20)), text("What is this?")]}], 1, True),
    ([{"role": "user", "content": [text("Describe the tall picture in detail, please:"),
                                   image((30, 220, 30), (20, 56))]}], 2, False),
    ([{"role": "user", "content": [image((30, 30, 220), (12, 12)), text("Small?")]}], 1, False),
    ([{"role": "user", "content": [image((200, 200, 30), (40, 30)), text("and"),
                                   image((30, 200, 200), (30, 90)), text("which is brighter?")]}], 1, True),
    ([{"role": "user", "content": [image((120, 40, 200), (64, 64)), image((240, 140, 20), (90, 28)),
                                   text("Compare.")]}], 2, True),
    ([{"role": "user", "content": [image((90, 90, 90), (36, 36)), text("Colour?")]},
      {"role": "assistant", "content": "Grey, I think."},
      {"role": "user", "content": "And its shape?"}], 1, False),
]


@pytest.fixture(scope="module", params=ANYRES)
def served(request):
    model, processor = tiny_model(request.param)
    expected = [reference(model, processor, messages, MAX_TOKENS) for messages, _, _ in CASES]
    rows = sum(n for _, n, _ in CASES)
    server = start_server(model, processor, max_batch_size=rows, max_queue=64)
    yield model, processor, server, expected
    server.stop()


def ask(url: str, messages: list[dict], n: int, stream: bool) -> list[str]:
    """The ``n`` answers (greedy) of one request, streamed or not."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, n=n)
    if not stream:
        return [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    texts = [""] * n
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    return texts


def images_of(job: Job) -> int:
    return 0 if job.pixel_values is None else job.pixel_values.shape[0]


def test_concurrent_requests_in_one_batch_each_equal_generate_alone(served):
    _, _, server, expected = served
    batcher = server.app.state.batcher
    rounds: list[list[Job]] = []
    lock = threading.Lock()

    def hook(jobs: list[Job]) -> None:
        with lock:
            rounds.append(list(jobs))

    batcher.step_hook = hook
    batcher.batch_wait_s = 120.0  # a hang guard: the worker starts as soon as every row is queued
    try:
        with ThreadPoolExecutor(len(CASES)) as pool:
            answers = list(pool.map(lambda case: ask(server.url, *case), CASES))
    finally:
        batcher.step_hook = None
        batcher.batch_wait_s = 0.005
    for (messages, n, stream), got, want in zip(CASES, answers, expected):
        assert got == [want] * n, (messages, stream)
    first = rounds[0]  # every request was admitted at once: one prefill, one encoding of all the images
    assert len(first) == len(CASES) and batcher.max_rows_seen == sum(n for _, n, _ in CASES)
    assert {images_of(job) for job in first} == {0, 1, 2}
    sizes = {tuple(s) for job in first if job.image_sizes is not None for s in job.image_sizes.tolist()}
    assert len(sizes) == 8  # every image's own size travelled with its request
    assert len({job.pixel_values.shape[1] for job in first if job.pixel_values is not None}) > 1  # view counts differ
    assert len({len(job.input_ids) for job in first}) > 1  # and so do the prompt lengths


def test_requests_arriving_over_time_each_equal_generate_alone(served):
    _, _, server, expected = served
    order = [3, 0, 6, 5, 1, 7, 2, 4, 6, 3, 0, 5]

    def one(k: int) -> tuple[int, list[str]]:
        messages, n, stream = CASES[k]
        return k, ask(server.url, messages, n, stream)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, order))
    assert [got for _, got in results] == [[expected[k]] * CASES[k][1] for k, _ in results]


def test_an_image_too_thin_for_the_grids_is_a_400_naming_it(served):
    _, _, server, expected = served
    messages = [{"role": "user", "content": [text("look"), image((200, 10, 10), (300, 2))]}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert "300 x 2 px is too thin for the anyres grids" in error["message"]
    assert "crop it (or pad it) towards a squarer shape" in error["message"]
    assert ask(server.url, *CASES[2]) == [expected[2]]  # the server goes on


def test_the_context_check_counts_the_positions_the_images_take_in_the_model(served):
    """xGen-MM's text holds one ``<image>`` per image, the model many vision tokens: a request that does not
    fit is a 400 before it runs (never a failure of the batch it would have joined)."""
    model, processor, server, _ = served
    messages = CASES[6][0]  # two images
    inputs = processor([to_processor_messages(messages)])
    media = model.prepare_media(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                image_sizes=inputs["image_sizes"])
    mask = inputs["attention_mask"] if media.grown_mask is None else media.grown_mask
    positions = int(mask.sum())  # what the model runs for this prompt
    context = processor.max_length
    processor.max_length = positions + 3
    try:
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 4, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert f"the prompt ({positions} tokens" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == reference(model, processor, messages, 3)
    finally:
        processor.max_length = context


def _job(pixels, sizes=None, n: int = 1) -> Job:
    return Job(input_ids=[1, 2], pixel_values=pixels, image_sizes=sizes, max_new_tokens=1, sink=lambda e: None, n=n)


def test_a_prefill_lays_out_every_rows_images_in_reading_order():
    a = torch.rand(2, 3, 3, 4, 4)  # two images of 3 views
    b = torch.rand(1, 5, 3, 4, 4)  # one image of 5 views
    jobs = [_job(a, torch.tensor([[8, 4], [4, 8]]), n=2), _job(None), _job(b, torch.tensor([[12, 4]]))]
    rows = [Row(job, i) for job in jobs for i in range(job.n)]
    pixels, sizes = batch_images(rows)
    assert pixels.shape == (5, 5, 3, 4, 4)  # (K, V_max, 3, S, S): each of the two rows of job 0 has its images
    assert torch.equal(pixels[0, :3], a[0]) and torch.equal(pixels[1, :3], a[1]) and torch.equal(pixels[2, :3], a[0])
    assert torch.equal(pixels[4], b[0]) and not pixels[:4, 3:].any()  # view padding is zeros
    assert sizes.tolist() == [[8, 4], [4, 8], [8, 4], [4, 8], [12, 4]]
    single = batch_images([Row(_job(torch.rand(2, 3, 4, 4)), 0), Row(_job(None), 0)])
    assert single[0].shape == (2, 2, 3, 4, 4) and single[1] is None  # one view per image: (R, N_max, 3, S, S)
    assert batch_images([Row(_job(None), 0)]) is None
