"""Property: the data readers read what they can, skip and count what they cannot, and never crash.

Random LLaVA JSON (missing and wrong-typed fields, broken lines), WebDataset shards with random
corruption (truncated or damaged tar files, bad JSON, bad image members) and mixture YAML with
random values. A run either yields samples (bad ones skipped and counted) or stops with an
interleaf error that says what is wrong; no other exception, no hang, nothing written elsewhere.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

import interleaf
from fuzz_profiles import assert_named_error, examples, sandbox, timeout  # noqa: F401 (sandbox: a fixture)
from interleaf.data import MixtureStream, load_mixture
from interleaf.data.formats import REASONS
from interleaf.data.stream import iter_source

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def processor():
    return interleaf.build("tiny-random", seed=0)[1]


def _png(seed: int = 0, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


GOOD = {fmt: _png(0, fmt) for fmt in ("PNG", "JPEG", "WEBP")}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def image_bytes(draw) -> bytes:
    data = GOOD[draw(st.sampled_from(sorted(GOOD)))]
    kind = draw(st.sampled_from(["good", "good", "truncated", "flipped", "random", "empty"]))
    if kind == "truncated":
        return data[: draw(st.integers(0, 2**20)) % len(data)]
    if kind == "flipped":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, 2**20)) % len(out)] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "random":
        return draw(st.binary(max_size=64))
    return b"" if kind == "empty" else data


def _consume(mixture: dict, base, processor) -> None:
    """Every sample of one epoch, through both the inspector's reader and the training stream."""
    try:
        cfg = load_mixture(mixture, base_dir=base)
        for sample, bad in iter_source(cfg.sources[0], processor):
            assert (sample is None) != (bad is None)
            if bad is not None:
                assert bad.reason in REASONS and bad.where and bad.detail
        stream = MixtureStream(cfg, processor, epochs=1)
        samples = stream.take(200)
    except Exception as e:  # noqa: BLE001 (the property is about which exceptions escape)
        assert_named_error(e)
        event(type(e).__name__)
        return
    event("accepted")
    for s in samples:
        assert len(s["input_ids"]) == len(s["labels"]) and all(x.shape[0] == 3 for x in s["images"])


# -- LLaVA JSON --

turns = st.one_of(
    st.fixed_dictionaries({
        "from": st.sampled_from(["human", "gpt", "user", "assistant", "system"]) | json_values,
        "value": st.sampled_from(["<image>\nWhat is it?", "a cat.", "<image><image> two", "", "<image>"])
        | st.text(max_size=20) | json_values,
    }),
    json_values,
)
records = st.fixed_dictionaries({}, optional={
    "id": json_values,
    "image": st.sampled_from(["good.png", "cut.png", "missing.png", "http://x/y.png", "sub/../good.png", "", "/"])
    | st.lists(st.sampled_from(["good.png", "cut.png", "missing.png"]), max_size=3) | json_values,
    "conversations": st.lists(turns, max_size=4) | json_values,
})


valid_records = st.fixed_dictionaries({
    "id": st.text(max_size=5),
    "conversations": st.lists(st.fixed_dictionaries({
        "from": st.sampled_from(["human", "gpt"]),
        "value": st.sampled_from(["<image>\nWhat is it?", "a cat.", "Describe it.", "<image>"]) | st.text(max_size=20)}),
        min_size=1, max_size=4),
}, optional={"image": st.sampled_from(["good.png", "cut.png", "missing.png"])})


@timeout(80, 1.0)
@settings(max_examples=examples(80))
@given(entries=st.lists(valid_records | records | json_values, max_size=6), layout=st.sampled_from(["list", "lines", "broken"]),
       extra=st.binary(max_size=20))
def test_llava_json_reads_or_fails_with_a_named_error(processor, sandbox, entries, layout, extra):
    (sandbox / "good.png").write_bytes(GOOD["PNG"])
    (sandbox / "cut.png").write_bytes(GOOD["PNG"][:100])
    path = sandbox / "c.json"
    if layout == "list":
        path.write_text(json.dumps(entries))
    else:
        lines = [json.dumps(e) for e in entries]
        body = "\n".join(lines).encode()
        path.write_bytes(body + (b"\n" + extra if layout == "broken" else b""))
    source = {"name": "c", "format": "llava", "paths": "c.json", "weight": 1}
    _consume({"sources": [source], "max_bad_fraction": 1.0, "max_length": 64}, sandbox, processor)


# -- WebDataset shards --

@st.composite
def shards(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["pairs", "interleaved"]))
    members: list[tuple[str, bytes]] = []
    for k in range(draw(st.integers(0, 5))):
        key = f"s{k:03d}"
        if fmt == "pairs":
            ext = draw(st.sampled_from(["png", "jpg", "webp", "gif", "bin"]))
            if draw(st.booleans()):
                members.append((f"{key}.{ext}", draw(image_bytes())))
            caption = draw(st.sampled_from(["txt", "json", "none"]))
            if caption == "txt":
                members.append((f"{key}.txt", draw(st.text(max_size=20)).encode() if draw(st.booleans())
                                else draw(st.binary(max_size=12))))
            elif caption == "json":
                meta = draw(st.fixed_dictionaries({}, optional={"caption": json_values, "text": json_values}) | json_values)
                members.append((f"{key}.json", json.dumps(meta).encode() if draw(st.booleans()) else b"{broken"))
        else:
            n = draw(st.integers(0, 3))
            images = [draw(st.sampled_from([None, f"{i}.png", f"{key}.{i}.png", "missing.png", "http://x/a.png", "Zm9v" * 20]) | json_values)
                      for i in range(n)]
            texts = [draw(st.none() | st.text(max_size=15) | json_values) for _ in range(n)]
            doc = draw(st.just({"texts": texts, "images": images}) | json_values)
            members.append((f"{key}.json", json.dumps(doc).encode()))
            for i in range(n):
                if draw(st.booleans()):
                    members.append((f"{key}.{i}.png", draw(image_bytes())))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "gzip", "garbage"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, 2**20)) % (len(raw) + 1)]
    elif damage == "flip" and raw:
        for _ in range(draw(st.integers(1, 6))):
            raw[draw(st.integers(0, 2**20)) % len(raw)] ^= draw(st.integers(1, 255))
    elif damage == "gzip":
        raw = bytearray(gzip.compress(bytes(raw)))
        if draw(st.booleans()):
            raw = raw[: draw(st.integers(0, 2**20)) % (len(raw) + 1)]
    elif damage == "garbage":
        raw = bytearray(draw(st.binary(max_size=600)))
    return fmt, bytes(raw)


@timeout(80, 1.0)
@settings(max_examples=examples(80))
@given(shard=shards(), n_shards=st.integers(1, 2))
def test_webdataset_shards_read_or_fail_with_a_named_error(processor, sandbox, shard, n_shards):
    fmt, raw = shard
    for i in range(n_shards):
        (sandbox / f"shard-{i}.tar").write_bytes(raw)
    source = {"name": "w", "format": fmt, "paths": "shard-*.tar", "weight": 1}
    _consume({"sources": [source], "max_bad_fraction": 1.0, "shuffle_buffer": 3, "max_length": 64}, sandbox, processor)


# -- mixture YAML --

source_fields = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["a", "b"]) | json_values,
    "format": st.sampled_from(["pairs", "interleaved", "llava"]) | json_values,
    "paths": st.sampled_from(["shard.tar", "c.json", "*.tar", "missing/*.tar", "$NOPE_UNSET/x", "~/x", "~nobody_here/x",
                              "a\x00b", "", "/"]) | st.lists(st.text(max_size=8), max_size=2) | json_values,
    "images_root": st.sampled_from([".", "imgs", "$HOME"]) | json_values,
    "image_path_map": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | json_values,
    "samples": st.integers(-2, 5) | json_values,
    "weight": st.floats() | json_values,
    "loss_weight": st.floats() | json_values,
    "task_prompt": st.text(max_size=10) | json_values,
    "max_images": st.integers(-1, 3) | json_values,
})
mixtures = st.fixed_dictionaries({}, optional={
    "sources": st.lists(source_fields | json_values, max_size=3) | json_values,
    "max_length": st.integers(-1, 100) | json_values,
    "shuffle_buffer": st.integers(-1, 5) | json_values,
    "seed": st.integers(-1, 2**70) | json_values,
    "max_bad_fraction": st.floats() | json_values,
    "samples_per_epoch": st.integers(-1, 5) | json_values,
    "bogus": json_values,
})


@timeout(100, 0.5)
@settings(max_examples=examples(100))
@given(mixture=mixtures | json_values, as_text=st.sampled_from(["yaml", "yaml", "garbage", "binary"]),
       garbage=st.text(max_size=40), binary=st.binary(max_size=40))
def test_mixture_yaml_loads_or_fails_with_a_named_error(processor, sandbox, mixture, as_text, garbage, binary):
    (sandbox / "shard.tar").write_bytes(b"")
    (sandbox / "c.json").write_text("[]")
    path = sandbox / "mix.yaml"
    if as_text == "yaml":
        path.write_text(yaml.safe_dump(mixture, allow_unicode=True))
    elif as_text == "garbage":
        path.write_text(garbage)
    else:
        path.write_bytes(binary)
    try:
        cfg = load_mixture(path)
        MixtureStream(cfg, processor, epochs=1).take(3)
    except Exception as e:  # noqa: BLE001
        assert_named_error(e)
