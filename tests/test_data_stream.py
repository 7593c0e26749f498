"""MixtureStream: deterministic order, exact resume, disjoint and complete rank shares, bad-sample accounting."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from helpers.data import broken_shard

import interleaf
from interleaf.data import BadSampleCounter, MixtureStream, load_mixture
from interleaf.data.formats import BadSample
from interleaf.errors import InputError

N_SCENES = 40


@pytest.fixture(scope="module")
def proc():
    return interleaf.build("tiny-random")[1]


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    return synth_corpus.get(n_train_scenes=N_SCENES, n_heldout_scenes=10, shard_size=15)  # 3 pair shards


def mixture(corpus, *, buffer=6, **counts):
    sizes = {"pairs": N_SCENES, "docs": N_SCENES // 4, "conv": N_SCENES}
    sizes.update(counts)
    sources = [
        {"name": "pairs", "format": "pairs", "paths": "pairs/*.tar", "samples": sizes["pairs"]},
        {"name": "docs", "format": "interleaved", "paths": "interleaved/*.tar", "samples": sizes["docs"]},
        {"name": "conv", "format": "llava", "paths": "llava/conv_train.json", "images_root": "images",
         "samples": sizes["conv"]},
    ]
    return load_mixture({"sources": sources, "shuffle_buffer": buffer, "max_length": 128}, base_dir=corpus)


def ids(samples) -> list[tuple[str, str]]:
    return [(s["source"], s["key"]) for s in samples]


def test_order_is_deterministic_for_a_seed_and_reshuffled_per_epoch(corpus, proc):
    mix = mixture(corpus)
    a = MixtureStream(mix, proc, seed=1).take(60)
    b = MixtureStream(mix, proc, seed=1).take(60)
    assert ids(a) == ids(b) and [s["input_ids"] for s in a] == [s["input_ids"] for s in b]
    assert ids(MixtureStream(mix, proc, seed=2).take(60)) != ids(a)
    stream = MixtureStream(mix, proc, seed=1)
    n = stream.epoch_length()
    first, second = stream.take(n), stream.take(n)
    assert stream.epoch == 1 and stream.samples_seen == 2 * n
    assert sorted(ids(first)) == sorted(ids(second)) and ids(first) != ids(second)
    assert len(set(ids(first))) == n  # counts equal to the sizes: every sample once per epoch


def test_resume_gives_exactly_the_same_samples(corpus, proc):
    mix = mixture(corpus, buffer=4)
    n = MixtureStream(mix, proc).epoch_length()
    for taken in (0, 7, n - 3, n + 11):  # at the start, inside a block, near and after the epoch end
        stream = MixtureStream(mix, proc, seed=3)
        stream.take(taken)
        state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as JSON
        expected = stream.take(25)
        resumed = MixtureStream(mix, proc, seed=3)
        resumed.load_state_dict(state)
        got = resumed.take(25)
        assert ids(got) == ids(expected)
        assert [s["input_ids"] for s in got] == [s["input_ids"] for s in expected]
        assert all((g["images"][0] == e["images"][0]).all() for g, e in zip(got, expected) if g["images"])
        assert resumed.samples_seen == stream.samples_seen and resumed.epoch == stream.epoch
    with pytest.raises(InputError, match="seed"):
        MixtureStream(mix, proc, seed=4).load_state_dict(state)


def test_rank_shares_are_disjoint_and_complete(corpus, proc):
    mix = mixture(corpus)
    whole = ids(MixtureStream(mix, proc, epochs=1))
    shares = [ids(MixtureStream(mix, proc, rank=r, world_size=3, epochs=1)) for r in range(3)]
    assert sum(len(s) for s in shares) == len(whole)
    assert sorted(sum(shares, [])) == sorted(whole)
    assert not set(shares[0]) & set(shares[1]) and not set(shares[1]) & set(shares[2])
    with pytest.raises(InputError, match="rank"):
        MixtureStream(mix, proc, rank=3, world_size=3)


def test_bad_samples_are_skipped_and_counted(tmp_path, proc):
    broken_shard(tmp_path / "b.tar", n_good=24, n_bad=6)
    (tmp_path / "c.jsonl").write_text('{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n{oops\n')
    sources = [{"name": "web", "format": "pairs", "paths": "b.tar", "samples": 48},
               {"name": "chat", "format": "llava", "paths": "c.jsonl", "samples": 2}]
    stream = MixtureStream(load_mixture({"sources": sources, "max_bad_fraction": 0.5}, base_dir=tmp_path), proc, epochs=1)
    samples = list(stream)
    assert len(samples) == 50 and all(s["key"] != "ok" or s["source"] == "chat" for s in samples)
    bad = stream.bad.counts[("web", "unreadable_image")]
    assert 6 < bad <= 12  # two passes over the shard (the second may end before its last bad samples)
    assert stream.bad.counts[("chat", "malformed_json")] >= 1
    assert stream.bad.to_dict()["seen"]["web"] == 48 + bad
    table = stream.bad.summary()
    assert "unreadable_image" in table and f"{bad / (48 + bad):.1%} of {48 + bad}" in table and "malformed_json" in table


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path, proc):
    broken_shard(tmp_path / "b.tar", n_good=21, n_bad=9)
    sources = [{"name": "web", "format": "pairs", "paths": "b.tar", "samples": 20, "max_images": 1}]
    stream = MixtureStream(load_mixture({"sources": sources}, base_dir=tmp_path), proc)
    with pytest.raises(InputError) as e:
        stream.take(40)
    msg = str(e.value)
    assert "source 'web'" in msg and "max_bad_fraction=0.1" in msg and "unreadable_image" in msg
    assert "%" in msg and "b.tar:s" in msg  # the share and an example of where


def test_a_source_with_no_usable_sample_is_an_error_not_a_hang(tmp_path, proc):
    broken_shard(tmp_path / "b.tar", n_good=0, n_bad=3)
    sources = [{"name": "web", "format": "pairs", "paths": "b.tar", "weight": 1}]
    stream = MixtureStream(load_mixture({"sources": sources, "max_bad_fraction": 1.0}, base_dir=tmp_path), proc)
    with pytest.raises(InputError, match="not one usable sample"):
        stream.take(1)


def test_counter_check_threshold():
    counter = BadSampleCounter(max_bad_fraction=0.25, min_seen=8)
    for _ in range(6):
        counter.add_good("s")
    counter.add_bad("s", BadSample("empty_text", "f:k", "no caption"))
    counter.add_bad("s", BadSample("empty_text", "f:k2", "no caption"))
    counter.check("s")  # 2 of 8 = 25%: allowed
    counter.add_bad("s", BadSample("too_many_images", "f:k3", "7 images"))
    with pytest.raises(InputError, match=r"3 of 9 samples \(33%\)"):
        counter.check("s")
    assert counter.to_dict() == {"seen": {"s": 9}, "bad": {"s": {"empty_text": 2, "too_many_images": 1}}}


def test_collated_batches_from_a_dataloader_feed_the_model(corpus):
    import torch
    from torch.utils.data import DataLoader

    from interleaf.data import collate

    model, proc = interleaf.build("tiny-random", seed=0)
    stream = MixtureStream(mixture(corpus), proc, seed=0)
    loader = DataLoader(stream, batch_size=4, collate_fn=lambda b: collate(b, proc.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 4 and batch["pixel_values"].shape[2:] == (3, 32, 32)
    assert stream.samples_seen == 4
    weights = batch.pop("loss_weight")
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss) and weights.shape == (4,)


def test_truncated_images_are_counted_and_the_stream_goes_on(tmp_path, proc):
    import numpy as np

    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)  # (H, W, 3)
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for i in range(12):
            fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt)
            data = buf.getvalue()
            data = data[: [20, len(data) // 2][i % 2]] if i < 6 else data  # s000..s005: cut in the header or the pixels
            for name, payload in ((f"s{i:03d}.{ext}", data), (f"s{i:03d}.txt", f"sample {i}.".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    sources = [{"name": "web", "format": "pairs", "paths": "t.tar", "samples": 6}]
    mixture = {"sources": sources, "max_bad_fraction": 0.6, "shuffle_buffer": 1}  # file order: the bad ones first
    stream = MixtureStream(load_mixture(mixture, base_dir=tmp_path), proc, epochs=1)
    samples = list(stream)
    assert [s["key"] for s in samples] == [f"s{i:03d}" for i in range(6, 12)]
    assert stream.bad.counts[("web", "unreadable_image")] == 6 and sum(stream.bad.counts.values()) == 6
    examples = stream.bad.examples[("web", "unreadable_image")]
    assert all("t.tar:s0" in e and "truncated or corrupt" in e for e in examples), examples
