"""Property: the processor returns a batch or raises an interleaf error naming the input, whatever it is given.

Prompts mix random text (unicode, empty, long), images of every Pillow mode and of sizes from 1x1
to a few hundred pixels (extreme aspect ratios too), encoded images in every format, truncated
or with flipped bytes, random bytes, wrong types and nested structures, and chat messages with
wrong roles and contents.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import interleaf
from fuzz_profiles import assert_named_error, examples, sandbox, timeout  # noqa: F401 (sandbox: a fixture)

pytestmark = pytest.mark.slow

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "La", "CMYK", "I", "I;16", "I;16B", "F", "YCbCr", "HSV",
         "LAB"]
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA"]


@pytest.fixture(scope="module")
def processor():
    return interleaf.build("tiny-random", seed=0)[1]


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    img = Image.fromarray(rgb, mode="RGB")
    for route in (lambda: img.convert(mode), lambda: img.convert("L").convert(mode), lambda: Image.new(mode, size)):
        try:
            return route()
        except (ValueError, OSError):
            continue
    return img


sizes = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 299), (299, 3), (1, 100_000), (100_000, 2)]),  # extreme aspect ratios
)
pil_images = st.builds(_image, st.sampled_from(MODES), sizes, st.integers(0, 2**16))


@st.composite
def encoded_images(draw) -> bytes:
    img = draw(pil_images)
    fmt = draw(st.sampled_from(FORMATS))
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except Exception:  # noqa: BLE001 (a mode or a size this format cannot hold: OSError, OverflowError, ...)
        buf = io.BytesIO()
        Image.new("RGB", img.size, (1, 2, 3)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, 2**20)) % max(1, len(data))]
    elif damage == "flip" and data:
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 2**20)) % len(data)] ^= draw(st.integers(1, 255))
    return bytes(data)


def _data_url(data: bytes, subtype: str) -> str:
    import base64

    return f"data:image/{subtype};base64," + base64.b64encode(data).decode()


texts = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.sampled_from(["<image>", "<|endofchunk|>", "<fake_token_around_image>", "\ue000", "http://x y", "data:image/"]),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(100, 3000)),  # long
)
image_items = st.one_of(
    pil_images,
    encoded_images(),
    st.builds(_data_url, encoded_images(), st.sampled_from(["png", "jpeg", "x"])),
    st.binary(max_size=64),
    st.builds(lambda b: bytearray(b), st.binary(max_size=16)),
)
wrong = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
                  st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3))
parts = st.one_of(
    texts,
    image_items,
    st.fixed_dictionaries({"type": st.just("text"), "text": texts | wrong}),
    st.fixed_dictionaries({"type": st.just("image"), "image": image_items | wrong}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.text(max_size=20) | wrong})}),
    st.fixed_dictionaries({"image": st.text(max_size=20) | wrong}),
    st.fixed_dictionaries({"path": st.text(max_size=20) | wrong}),
    wrong,
)
items = st.recursive(parts, lambda inner: st.lists(inner, max_size=3), max_leaves=8)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | st.text(max_size=8) | wrong,
     "content": texts | st.lists(parts, max_size=4) | wrong},
)
plain_items = st.one_of(st.text(min_size=1, max_size=40), pil_images, encoded_images())
plain_messages = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]),
    "content": st.text(max_size=30) | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
        | st.fixed_dictionaries({"type": st.just("image"), "image": pil_images | encoded_images()}), max_size=3),
})
prompts = st.one_of(
    st.lists(plain_items, min_size=1, max_size=4),  # near-valid: mostly accepted
    st.lists(st.lists(plain_items, min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(plain_messages, min_size=1, max_size=3),
    st.lists(items, max_size=6),  # one prompt
    st.lists(st.lists(items, max_size=5), min_size=0, max_size=3),  # a batch
    st.lists(messages, min_size=1, max_size=4),  # one conversation
    st.lists(st.lists(messages, min_size=1, max_size=3), min_size=1, max_size=2),  # a batch of conversations
    items,
    wrong,
)
options = st.fixed_dictionaries({}, optional={
    "padding": st.sampled_from(["longest", "max_length", False, True, "bogus"]),
    "padding_side": st.sampled_from(["left", "right", "middle"]),
    "truncation": st.booleans(),
    "max_length": st.none() | st.integers(-2, 300),
    "add_generation_prompt": st.none() | st.booleans(),
})


@timeout(100, 1.0)
@settings(max_examples=examples(100))
@given(prompt=prompts, kwargs=options)
def test_processor_returns_a_batch_or_a_named_error(processor, sandbox, prompt, kwargs):
    try:
        out = processor(prompt, **kwargs)
    except Exception as e:  # noqa: BLE001 (the property is about which exceptions escape)
        assert_named_error(e)
        event(type(e).__name__)
        return
    event("accepted")
    b, t = out["input_ids"].shape
    assert out["attention_mask"].shape == (b, t) and out["image_attention_mask"].shape[:2] == (b, t)
    if "pixel_values" in out:
        assert out["pixel_values"].shape[:2] == (b, out["image_attention_mask"].shape[2])


@timeout(80, 0.5)
@settings(max_examples=examples(80))
@given(data=encoded_images(), as_=st.sampled_from(["bytes", "path", "data_url", "lazy_pil"]))
# Found by fuzzing: a TIFF whose height a flipped byte made 720,897 pixels (1 pixel wide). Scaling
# its shortest edge first made a 32 x 23,068,704 intermediate (3 GB; a taller one OOM-killed the run).
@example(data=b"II*\x00\x08\x00\x00\x00\x08\x00\x00\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x01\x01\x04\x00"
         b"\x01\x00\x00\x00\x01\x00\x0b\x00\x03\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x06\x01\x03\x00\x01"
         b"\x00\x00\x00\x01\x00\x00\x00\x11\x01\x04\x00\x01\x00\x00\x00n\x00\x00\x00\x16\x01\x04\x00\x01\x00\x00"
         b"\x00\x01\x00\x00\x00\x17\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x1c\x01\x03\x00\x01\x00\x00\x00"
         b"\x01\x00\x00\x00\x00\x00\x00\x00\x00", as_="bytes")
def test_an_encoded_image_loads_or_fails_naming_the_item(processor, sandbox, data, as_):
    path = sandbox / "image.bin"
    if as_ == "path":
        path.write_bytes(data)
        item = path
    elif as_ == "data_url":
        item = _data_url(data, "png")
    elif as_ == "lazy_pil":
        try:
            item = Image.open(io.BytesIO(data))  # only the header is read
        except Exception:  # noqa: BLE001 (Pillow's own failure to open is not what is tested here)
            item = data
    else:
        item = data
    try:
        out = processor([["look:", item, "ok"]])
    except Exception as e:  # noqa: BLE001
        assert_named_error(e)
        assert "batch row 0, prompt item 1" in str(e), str(e)
        return
    assert out["pixel_values"].shape[:2] == (1, 1) and bool(out["pixel_values"].isfinite().all())
