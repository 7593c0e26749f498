"""The server under load against the batched-``generate`` ceiling: the same requests, the same model, one process.

    python benchmarks/serve.py [--family cross_attention|token_insertion] [--size smoke|tiny|mid]
        [--requests R] [--clients C] [--batch B] [--gap S] [--new-tokens T] [--seed N]
        [--threads N] [--repeats K] [--results [DIR]] [--smoke]

The model: random weights at one of ``vs_transformers.SIZES`` (``tiny``: LLaMA 256 wide x 4 layers;
``mid``: LLaMA 1024 wide x 12 layers with a ViT-B/32-shaped tower at 224 px), built with
``interleaf.build`` from the ``tiny-random`` preset (cross-attention, blocks every ``interval``
layers, gates open) or the ``tiny-llava`` preset (token insertion, a CLIP tower and an MLP
projector), with the presets' chat template and the tiny tokenizer.

The workload (seeded, the same every run): ``R`` chat requests, a third text only, a third with one
image, a third with two images of different sizes (PNG ``data:`` URLs), prompts of 3 to 48 words,
``max_tokens`` drawn from ``[min(8, T // 2), T]`` (``T``: ``--new-tokens``), greedy, streamed.

- server: ``create_app`` + ``ServerThread`` in this process, ``max_batch_size=B``; ``C`` clients
  (asyncio, one event loop) each send their share of the requests one after the other, waiting a
  seeded random gap (uniform in ``[0, 2 S]``) before each. Completion tokens are the ``usage`` of
  each stream; a request's latency runs from sending it to the stream's end, its time to first
  token to the first chunk with content. Throughput: all completion tokens over the wall time
  from the first request sent to the last stream ended. A few requests go through first to warm up.
- ceiling: the same requests in order, in batches of ``B``, through ``model.generate`` on the
  processor's batched output (greedy, each batch's ``max_new_tokens`` its longest request's);
  each request counts only its own completion tokens, as the server does (up to and including
  its first end token, at most its ``max_tokens``). Only the ``generate`` calls are timed (the
  processor runs before), median of ``--repeats`` passes over all batches after a warm-up.

Each server answer is compared with the ceiling's answer to the same request (text and token
count; greedy, so they must be equal) and the number that match is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import Row  # noqa: E402
from vs_transformers import SIZES  # noqa: E402

import interleaf  # noqa: E402
from interleaf.generation import generation_kwargs  # noqa: E402
from interleaf.serving import ServerThread, create_app  # noqa: E402

MODEL_NAME = "interleaf-bench"
TARGET = 0.8  # server completion tokens/s / the ceiling's, at the mid size
WORDS = ("the", "picture", "shows", "a", "red", "square", "next", "to", "blue", "circle", "under", "green",
         "sky", "describe", "colours", "shapes", "count", "objects", "left", "right", "bright", "small")
IMAGE_SIZES = ((24, 20), (48, 40), (64, 48), (96, 96), (160, 120), (256, 192))


@dataclass
class Request:
    """One chat request of the workload, in the server's form and in the processor's."""

    index: int
    messages: list[dict]  # OpenAI messages, images as PNG data: URLs
    conversation: list[dict]  # the same messages for the processor, images as PIL images
    max_tokens: int
    images: int


@dataclass
class Outcome:
    """What one request got back: the answer, its completion tokens, the times (s) and any error."""

    text: str = ""
    tokens: int = 0
    latency: float = math.nan
    ttft: float | None = None
    error: str | None = None
    sent: float = math.nan
    ended: float = math.nan


@dataclass
class Ceiling:
    answers: list[tuple[str, int]] = field(default_factory=list)  # (text, completion tokens) per request
    seconds: float = 0.0


# -- the model --
def build_model(family: str, size_name: str):
    """(model, processor) of ``family`` at ``SIZES[size_name]``, random weights, chat template of the preset."""
    size = SIZES[size_name]
    v, p = size["vision"], size["perceiver"]
    lm = dict(model_type="llama", vocab_size=None, max_position_embeddings=2048, tie_word_embeddings=False,
              **size["lm"])
    if family == "cross_attention":
        model, processor = interleaf.build(
            "tiny-random", lm=lm, seed=0,
            vision=dict(kind="builtin", image_size=v["image"], patch_size=v["patch"], width=v["hidden"],
                        layers=v["layers"], heads=v["heads"], mlp_ratio=v["mlp"] // v["hidden"]),
            resampler=dict(depth=p["resampler_depth"], num_latents=p["resampler_n_latents"],
                           heads=p["resampler_n_heads"], head_dim=p["resampler_head_dim"]),
            cross_attention=dict(every_n_layers=size["interval"]),
        )
        with torch.no_grad():  # open gates: the images change the answers
            for block in model.cross_attention_blocks:
                block.attn_gate.fill_(1.0)
                block.ffn_gate.fill_(1.0)
        return model, processor
    clip = dict(hidden_size=v["hidden"], intermediate_size=v["mlp"], num_hidden_layers=v["layers"],
                num_attention_heads=v["heads"], image_size=v["image"], patch_size=v["patch"])
    return interleaf.build("tiny-llava", lm=lm, seed=0, vision=dict(kind="clip", hf_config=clip))


# -- the workload --
def picture(rng: random.Random) -> Image.Image:
    """A PNG-safe RGB image of a random size from ``IMAGE_SIZES``: a colour and a few contrasting dots."""
    w, h = rng.choice(IMAGE_SIZES)
    colour = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (w, h), colour)
    for _ in range(8):
        img.putpixel((rng.randrange(w), rng.randrange(h)), tuple(255 - c for c in colour))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(count: int, top_tokens: int, seed: int) -> list[Request]:
    """``count`` requests: request i holds ``i % 3`` images, a prompt of 3 to 48 words, its own max_tokens."""
    rng = random.Random(seed)
    low = max(1, min(8, top_tokens // 2))
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 48)))
        images = [picture(rng) for _ in range(i % 3)]
        parts = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if images else text}]
        conversation = [{"role": "user", "content": [*({"type": "image", "image": img} for img in images),
                                                     {"type": "text", "text": text}] if images else text}]
        out.append(Request(i, messages, conversation, rng.randint(low, top_tokens), len(images)))
    return out


# -- the ceiling: model.generate in batches --
def own_tokens(new: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """A row's own completion: its first ``max_tokens`` new tokens, cut after its first end token."""
    new = new[:max_tokens]
    return next((new[: k + 1] for k, t in enumerate(new) if t in eos), new)


def run_ceiling(model, processor, requests: list[Request], batch: int, repeats: int) -> Ceiling:
    """The requests in order, ``batch`` at a time, through ``model.generate``: each request's answer and
    the median time of ``repeats`` passes (after one warm-up pass) of the ``generate`` calls alone."""
    eos = set(generation_kwargs(processor, max_new_tokens=1).get("eos_token_id", []))
    chunks = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    inputs = [processor([r.conversation for r in chunk]) for chunk in chunks]
    answers: list[tuple[str, int]] = [("", 0)] * len(requests)

    def one_pass() -> float:
        spent = 0.0
        for chunk, given in zip(chunks, inputs):
            kwargs = generation_kwargs(processor, max_new_tokens=max(r.max_tokens for r in chunk))
            start = time.perf_counter()
            out = model.generate(**given, **kwargs)  # (b, T + new)
            spent += time.perf_counter() - start
            width = given["input_ids"].shape[1]
            for row, r in enumerate(chunk):
                tokens = own_tokens(out[row, width:].tolist(), r.max_tokens, eos)
                answers[r.index] = (processor.decode(tokens, skip_special_tokens=True), len(tokens))
        return spent

    one_pass()  # warm-up
    seconds = statistics.median(one_pass() for _ in range(max(1, repeats)))
    return Ceiling(answers, seconds)


# -- the server under load --
async def ask(http, url: str, request: Request) -> Outcome:
    """One streamed request; its answer, usage and times."""
    body = {"model": MODEL_NAME, "messages": request.messages, "max_tokens": request.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out = Outcome(sent=time.perf_counter())
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    out.error = chunk["error"].get("message", "error")
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        out.ttft = out.ttft if out.ttft is not None else time.perf_counter() - out.sent
                        out.text += piece
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    out.ended = time.perf_counter()
    out.latency = out.ended - out.sent
    return out


async def drive(url: str, requests: list[Request], clients: int, gap: float, seed: int) -> list[Outcome]:
    """``clients`` clients, client c sending requests c, c + C, ... one after the other, each after a
    seeded random gap in ``[0, 2 gap]`` seconds."""
    import httpx

    outcomes: list[Outcome] = [Outcome() for _ in requests]

    async def client(c: int, http) -> None:
        rng = random.Random(seed * 1000 + c)
        for request in requests[c::clients]:
            await asyncio.sleep(rng.uniform(0.0, 2 * gap))
            try:
                outcomes[request.index] = await ask(http, url, request)
            except httpx.HTTPError as e:
                outcomes[request.index] = Outcome(error=f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return outcomes


def run_server(model, processor, requests: list[Request], clients: int, batch: int, gap: float,
               seed: int) -> tuple[list[Outcome], float]:
    """Serve the model in this process and drive the workload through it: (outcomes, wall seconds)."""
    app = create_app(model, processor, model_name=MODEL_NAME, max_batch_size=batch, max_queue=max(64, 2 * clients))
    server = ServerThread(app).start()
    try:
        asyncio.run(drive(server.url, requests[:3], 1, 0.0, seed))  # warm-up, not counted
        outcomes = asyncio.run(drive(server.url, requests, clients, gap, seed))
    finally:
        server.stop()
    done = [o for o in outcomes if o.error is None]
    wall = max(o.ended for o in done) - min(o.sent for o in done) if done else math.nan
    return outcomes, wall


# -- the table --
def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0..100) of ``values``; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def report(args, requests, ceiling: Ceiling, outcomes: list[Outcome], wall: float, prompt_lengths) -> dict:
    """The rows, the latency figures and the printed lines."""
    done = [o for o in outcomes if o.error is None]
    failed = [f"request {i}: {o.error}" for i, o in enumerate(outcomes) if o.error is not None]
    matched = sum(o.error is None and (o.text, o.tokens) == ceiling.answers[i] for i, o in enumerate(outcomes))
    server_tokens, ceiling_tokens = sum(o.tokens for o in done), sum(n for _, n in ceiling.answers)
    target = TARGET if args.size == "mid" else None
    rows = [
        Row("completion tokens", ceiling_tokens / ceiling.seconds, server_tokens / wall, "tokens/s", True, target),
        Row("requests", len(requests) / ceiling.seconds, len(done) / wall, "requests/s", True),
    ]
    latency = [o.latency for o in done]
    ttft = [o.ttft for o in done if o.ttft is not None]
    figures = {"request latency": (percentile(latency, 50), percentile(latency, 95)),
               "time to first token": (percentile(ttft, 50), percentile(ttft, 95))}
    kinds = [sum(r.images == k for r in requests) for k in range(3)]
    lines = benchlib.header(f"the server vs batched generate, {args.family}, {args.size} size", args.threads,
                            args.argv, "serve.py")
    lines += [
        f"{len(requests)} requests from {args.clients} clients (each waits a seeded gap uniform in "
        f"[0, {2 * args.gap:g}] s before each request), {kinds[0]} text only / {kinds[1]} with 1 image / "
        f"{kinds[2]} with 2 images, prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens, max_tokens "
        f"{min(r.max_tokens for r in requests)}-{max(r.max_tokens for r in requests)}, greedy, streamed; "
        f"max_batch_size {args.batch}; {args.parameters:,} parameters. Ceiling: `model.generate` on the "
        f"same requests in batches of {args.batch} (generate calls timed, median of {args.repeats} after a "
        f"warm-up). Completion tokens: server {server_tokens:,}, ceiling {ceiling_tokens:,}; "
        f"server answers equal to the ceiling's: {matched}/{len(requests)}"
        + (f"; FAILED: {len(failed)} ({'; '.join(failed[:3])})" if failed else ""),
        "",
        *benchlib.table(rows, "generate ceiling", "server"),
        "",
        f"| server under load ({len(done)} requests) | p50 | p95 |",
        "| --- | ---: | ---: |",
        *(f"| {name} (s) | {p50:.3f} | {p95:.3f} |" for name, (p50, p95) in figures.items()),
    ]
    return dict(rows=rows, figures=figures, matched=matched, failed=failed, server_tokens=server_tokens,
                ceiling_tokens=ceiling_tokens, lines=lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["cross_attention", "token_insertion"], default="cross_attention")
    benchlib.size_arguments(parser, SIZES)
    parser.add_argument("--requests", type=int, default=None, help="requests in the workload (default 64; smoke 8)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16; smoke 4)")
    parser.add_argument("--batch", type=int, default=8, help="the server's max_batch_size and the ceiling's batch")
    parser.add_argument("--gap", type=float, default=0.05, help="mean seconds a client waits before each request")
    parser.add_argument("--seed", type=int, default=0, help="the workload's and the gaps' seed")
    args = benchlib.parse_size_arguments(parser, argv)
    args.argv = argv
    args.requests = args.requests or (8 if args.smoke else 64)
    args.clients = args.clients or (4 if args.smoke else 16)
    if min(args.requests, args.clients, args.batch) < 1 or args.gap < 0:
        parser.error("--requests, --clients and --batch must be at least 1, --gap at least 0")
    with benchlib.quiet():
        torch.set_num_threads(args.threads)
        model, processor = build_model(args.family, args.size)
        args.parameters = model.num_parameters()
        requests = workload(args.requests, args.new_tokens or SIZES[args.size]["new_tokens"], args.seed)
        prompt_lengths = [int(processor([r.conversation])["attention_mask"].sum()) for r in requests]
        ceiling = run_ceiling(model, processor, requests, args.batch, args.repeats)
        outcomes, wall = run_server(model, processor, requests, args.clients, args.batch, args.gap, args.seed)
        out = report(args, requests, ceiling, outcomes, wall, prompt_lengths)
        out["text"] = benchlib.emit(out.pop("lines"), args.results)
        out["outcomes"], out["ceiling"] = outcomes, ceiling
        return out


if __name__ == "__main__":
    main()
