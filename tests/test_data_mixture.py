"""Mixture YAML: validation errors that name the field, counts per epoch, weights, loss multipliers, task prompts."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

import interleaf
from interleaf.data import MixtureStream, load_mixture
from interleaf.data.tokenize import IGNORE_INDEX
from interleaf.errors import ConfigError

N_SCENES = 60  # 60 pairs (2 shards), 15 documents, 60 conversations, 300 VQA entries


@pytest.fixture(scope="module")
def proc():
    return interleaf.build("tiny-random")[1]


@pytest.fixture(scope="module")
def corpus(synth_corpus, tmp_path_factory):  # a copy: tests write their mixture files into it
    return synth_corpus.copy(tmp_path_factory.mktemp("corpus") / "corpus", n_train_scenes=N_SCENES, n_heldout_scenes=10,
                             shard_size=30)


def write_yaml(folder, data) -> str:
    path = folder / "mix.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def base_sources():
    return [
        {"name": "pairs", "format": "pairs", "paths": ["pairs/*.tar"], "samples": 100, "loss_weight": 0.2,
         "task_prompt": "Please describe the image."},
        {"name": "conv", "format": "llava", "paths": "llava/conv_train.json", "images_root": "images", "samples": 7,
         "task_prompt": "Answer the question using a single word or phrase."},
    ]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d["sources"][1].update(samples=-5), "sources[1].samples"),
        (lambda d: d["sources"][0].update(format="webdataset"), "sources[0].format"),
        (lambda d: d["sources"][1].update(colour="red"), "sources[1].colour"),
        (lambda d: d["sources"][0].update(paths=["missing/*.tar"]), "sources[0].paths[0]"),
        (lambda d: d["sources"][1].pop("samples"), "sources[1].samples"),
        (lambda d: d["sources"][1].update(name="pairs"), "sources[1].name"),
        (lambda d: d["sources"][0].update(images_root="images"), "sources[0].images_root"),
        (lambda d: d["sources"][0].update(loss_weight="high"), "sources[0].loss_weight"),
        (lambda d: d["sources"][1].update(max_images=0), "sources[1].max_images"),
        (lambda d: d.update(max_bad_fraction=1.5), "max_bad_fraction"),
        (lambda d: d.update(shufle_buffer=10), "shufle_buffer"),
        (lambda d: d.update(sources=[]), "sources"),
    ],
)
def test_yaml_errors_name_the_field(corpus, change, field):
    data = {"max_length": 64, "sources": base_sources()}
    change(data)
    with pytest.raises(ConfigError) as e:
        load_mixture(write_yaml(corpus, data))
    assert e.value.field == field
    assert f"'{field}'" in str(e.value)


def test_paths_are_relative_to_the_yaml_folder(corpus, tmp_path):
    mixture = load_mixture(write_yaml(corpus, {"sources": base_sources(), "shuffle_buffer": 16}))
    assert mixture.shuffle_buffer == 16 and mixture.max_bad_fraction == 0.1 and mixture.seed == 0
    pairs, conv = mixture.sources
    assert [f.rsplit("/", 2)[-2:] for f in pairs.files()] == [["pairs", "train-000000.tar"], ["pairs", "train-000001.tar"]]
    assert conv.images_root == str(corpus / "images") and conv.max_images == 6
    with pytest.raises(ConfigError):  # the same YAML elsewhere points at nothing
        load_mixture({"sources": base_sources()}, base_dir=tmp_path)


def test_counts_oversample_and_subsample_with_loss_weights_and_task_prompts(corpus, proc):
    path = write_yaml(corpus, {"max_length": 96, "shuffle_buffer": 8, "sources": base_sources()})
    stream = MixtureStream(path, proc, epochs=1)
    assert stream.epoch_length() == 107
    samples = list(stream)
    counts = Counter(s["source"] for s in samples)
    assert counts == {"pairs": 100, "conv": 7}
    keys = Counter(s["key"] for s in samples if s["source"] == "pairs")
    assert len(keys) == N_SCENES and min(keys.values()) == 1 and max(keys.values()) == 2  # a full pass, then 40 more
    assert len({s["key"] for s in samples if s["source"] == "conv"}) == 7  # a subset, no repeats
    tok = proc.tokenizer
    for s in samples:
        assert s["loss_weight"] == (0.2 if s["source"] == "pairs" else 1.0)
        text = tok.decode(s["input_ids"], skip_special_tokens=False)
        trained = tok.decode([t for t in s["labels"] if t != IGNORE_INDEX], skip_special_tokens=False)
        prompt = "Please describe the image." if s["source"] == "pairs" else "Answer the question using a single word or phrase."
        assert text.count(prompt) == 1 and prompt not in trained
    assert stream.epoch == 0 and stream.samples_seen == 107


def test_weights_set_the_share_of_each_source(corpus, proc):
    sources = [
        {"name": "vqa", "format": "llava", "paths": "llava/vqa_train.json", "images_root": "images", "weight": 3},
        {"name": "conv", "format": "llava", "paths": "llava/conv_train.json", "images_root": "images", "weight": 1},
    ]
    stream = MixtureStream(load_mixture({"sources": sources, "samples_per_epoch": 400}, base_dir=corpus), proc, epochs=1)
    counts = Counter(s["source"] for s in stream)
    assert sum(counts.values()) == 400
    # weights 3:1 -> 0.75. The draw is a pure function of the mixture's seed (0 here): measured 0.740,
    # and 0.710-0.773 over seeds 0-4; asserts 0.75 +- 0.07, about 3 standard deviations of 400 draws.
    assert 0.68 < counts["vqa"] / 400 < 0.82
    # without samples_per_epoch, an epoch is the sources' total size
    stream = MixtureStream(load_mixture({"sources": sources}, base_dir=corpus), proc)
    assert stream.epoch_length() == 5 * N_SCENES + N_SCENES


def test_paths_expand_environment_variables(tmp_path, monkeypatch):
    import pytest

    from interleaf.data.mixture import load_mixture
    from interleaf.errors import ConfigError

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    monkeypatch.setenv("MY_DATA", str(tmp_path / "shards"))
    mix = load_mixture({"sources": [{"name": "p", "format": "pairs", "paths": "${MY_DATA}/*.tar", "weight": 1}]})
    assert mix.sources[0].files() == [str(tmp_path / "shards" / "a.tar")]
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.paths.*MY_DATA in .* is not set"):
        load_mixture({"sources": [{"name": "p", "format": "pairs", "paths": "$MY_DATA/*.tar", "weight": 1}]})
