"""Shared pieces of the serving tests: a tiny model whose images matter, a live server, references."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import torch
from PIL import Image
from tiny import tiny_preset

import interleaf
from interleaf.generation import generation_kwargs
from interleaf.serving import ServerThread, create_app

MODEL_NAME = "tiny"

FAMILIES = ("tiny-random", "tiny-llava")
"""The tiny preset of each fusion family (cross-attention, token insertion); serving tests run on both."""

ANYRES = ("tiny-llava-next", "tiny-xgenmm")
"""Tiny token-insertion models that tile images at any resolution, one per convention: LLaVA-NeXT's
(``expand`` placement, pinpoints, ``image_newline``) and xGen-MM instruct's (``replace`` placement,
(W, H) grids, the perceiver token sampler); each image's token count depends on its size."""

# xGen-MM instruct's architecture at the size of tiny-llava-next: its 32 px views, a one-layer token sampler
_XGENMM = dict(
    projector={"kind": "token_sampler", "token_sampler": {"depth": 1, "num_latents": 4, "heads": 2, "head_dim": 8}},
    insertion={"placement": "replace", "anyres": {"convention": "xgenmm", "base_size": 32, "patch_size": 8}},
)


def tiny_model(family: str = "tiny-random"):
    """(model, processor) of ``family`` (a preset in :data:`FAMILIES` or a model in :data:`ANYRES`), with
    answers that depend on the images: tiny-random with open gates and a louder resampler; the others as built."""
    if family == "tiny-random":
        return tiny_preset(seed=0, gates=1.0, resampler_scale=10.0)
    if family in ("tiny-llava", "tiny-llava-next"):
        return interleaf.build(family, seed=0)
    if family == "tiny-xgenmm":
        return interleaf.build("tiny-llava-next", seed=0, **_XGENMM)
    raise ValueError(f"unknown family preset {family!r}; choose one of {FAMILIES + ANYRES}")


def start_server(model, processor, **options: Any) -> ServerThread:
    app = create_app(model, processor, model_name=MODEL_NAME, **options)
    return ServerThread(app).start()


def served_with_client(family: str):
    """Yields ``(model, processor, server, openai_client)`` for a tiny ``family`` model; stops the server after
    (the body of a module fixture: ``yield from served_with_client(request.param)``)."""
    import openai

    model, processor = tiny_model(family)
    server = start_server(model, processor)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield model, processor, server, client
    finally:
        server.stop()


def png(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Image.Image:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 4):  # some structure, so two images differ beyond their colour
        img.putpixel((x, x % size[1]), (255 - color[0], 255 - color[1], 255 - color[2]))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_processor_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages (image_url data URLs) -> the processor's messages (PIL images)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image_url":
                    raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(raw))})
                else:
                    parts.append(p)
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


def rss_bytes() -> int:
    """This process's resident memory in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


def reference(model, processor, messages: list[dict], max_new_tokens: int) -> str:
    """What ``model.generate`` alone answers (greedy) to the OpenAI-style ``messages``, in one call with the
    processor's whole output: the same for either family, since ``generate`` returns the caller's prompt
    followed by the new tokens in both."""
    inputs = processor([to_processor_messages(messages)])
    out = model.generate(**inputs, **generation_kwargs(processor, max_new_tokens=max_new_tokens))
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def replace_twin(model):
    """A token-insertion ``model``'s weights with xGen-MM's placement (one ``<image>`` per image, grown by the model)."""
    from interleaf.config import InterleafConfig
    from interleaf.model import InterleafForConditionalGeneration

    data = model.config.to_dict()
    data["insertion"] = {"placement": "replace"}
    twin = InterleafForConditionalGeneration(InterleafConfig(**data))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def one_token_per_image(batch: dict, image_token_id: int, pad_token_id: int) -> dict:
    """A left-padded batch in LLaVA's layout (one ``<image>`` per vision token) rewritten with one ``<image>``
    per image, as xGen-MM's text holds them; ``pixel_values`` is kept."""
    rows = []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        row = [t for t, m in zip(ids, mask) if m]
        rows.append([t for p, t in enumerate(row) if t != image_token_id or p == 0 or row[p - 1] != image_token_id])
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "pixel_values": batch["pixel_values"],
    }


def answers_of(r: httpx.Response, body: dict) -> list[str]:
    """Each choice's text, from a JSON answer or from the events of a streamed one."""
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return [c["message"]["content"] for c in r.json()["choices"]]
    texts = [""] * body["n"]
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
    return texts
