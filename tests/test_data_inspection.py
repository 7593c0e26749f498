"""The library behind `interleaf data inspect`: format sniffing, the mixture a path stands for, per-source reports."""

from __future__ import annotations

import json

import pytest

import interleaf
from helpers.data import png, write_tar
from helpers.families import FAMILIES, build_family

RED = (200, 30, 30)

from interleaf.data.inspection import (
    corpus_images_root,
    guess_format,
    inspect_source,
    mixture_for_source,
    shorten_image_runs,
    source_size,
)
from interleaf.data.stream import BadSampleCounter, iter_source
from interleaf.errors import InputError


def test_guess_format_reads_the_first_sample(tmp_path):
    pairs = write_tar(tmp_path / "p.tar", [("a.png", png(RED, 32)), ("a.txt", b"a red square.")])
    docs = write_tar(tmp_path / "d.tar", [("a.json", json.dumps({"texts": ["x", None]}).encode())])
    garbled = write_tar(tmp_path / "g.tar", [("a.json", b"\xff not json"), ("a.txt", b"t")])
    assert guess_format([pairs]) == "pairs"
    assert guess_format([docs]) == "interleaved"
    assert guess_format([garbled]) == "pairs"  # unreadable JSON: not a document
    assert guess_format([str(tmp_path / "x.json"), str(tmp_path / "y.jsonl")]) == "llava"
    empty = write_tar(tmp_path / "e.tar", [])
    with pytest.raises(InputError, match="cannot guess the format"):
        guess_format([empty])


def test_corpus_images_root_follows_a_synth_manifest(tmp_path):
    (tmp_path / "llava").mkdir()
    llava = tmp_path / "llava" / "vqa.json"
    llava.write_text("[]")
    assert corpus_images_root(str(llava)) is None  # no corpus.json: not a synth corpus
    (tmp_path / "corpus.json").write_text(json.dumps({"images_dir": "images"}))
    assert corpus_images_root(str(llava)) == tmp_path.resolve() / "images"


def test_mixture_for_source_builds_one_source(tmp_path):
    shard = write_tar(tmp_path / "train-0.tar", [("a.png", png(RED, 32)), ("a.txt", b"a red square.")])
    mixture = mixture_for_source(str(tmp_path / "*.tar"))
    (cfg,) = mixture.sources
    assert cfg.format == "pairs" and cfg.files() == [shard] and source_size(cfg) == 1
    with pytest.raises(InputError, match="matches no file"):
        mixture_for_source(str(tmp_path / "none.tar"))


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_source_reports_shown_good_and_bad(tmp_path, family):
    members = [("a.png", png(RED, 32)), ("a.txt", b"a red square."), ("b.png", b"garbage"), ("b.txt", b"broken."),
               ("c.png", png(RED, 32)), ("c.txt", b"another red square.")]
    shard = write_tar(tmp_path / "s.tar", members)
    (cfg,) = mixture_for_source(shard, "pairs").sources
    processor = build_family(family)[1]
    counter = BadSampleCounter(max_bad_fraction=1.0)
    report = inspect_source(cfg, processor, counter=counter, max_length=64, show=1, scan=10)
    assert (report.size, report.num_files, report.scanned, report.good) == (3, 1, 3, 2)
    assert [b.reason for b in report.bad] == ["unreadable_image"]
    (shown,) = report.shown
    assert shown.key == "a" and shown.num_images == 1 and 0 < shown.num_trained < shown.num_tokens
    assert "[[a red square." in shown.rendered
    # an image as its format writes it: one <image>, or LLaVA's 16 (one per vision token) shown with their count
    image = {"expand": "<image>*16"}.get(family, "<image>")
    assert f"{image}[[a red square." in shown.rendered and shown.rendered.count("<image>") == 1
    assert counter.seen[cfg.name] == 3 and counter.bad(cfg.name) == 1
    report = inspect_source(cfg, processor, counter=BadSampleCounter(max_bad_fraction=1.0), max_length=64, scan=1)
    assert report.scanned == 1 and report.good == 1


def test_shorten_image_runs_counts_each_image_apart():
    text = "<s>" + "<image>" * 8 + "a" + "<image>" * 4
    assert shorten_image_runs(text, "<image>", 4) == "<s><image>*4<image>*4a<image>*4"
    assert shorten_image_runs(text, "<image>", 1) == text  # one token per image: as written
    # each image's own count, in order (LLaVA-NeXT): a run of two images is split by the counts
    assert shorten_image_runs(text, "<image>", [5, 3, 4]) == "<s><image>*5<image>*3a<image>*4"
    assert shorten_image_runs(text, "<image>", [8]) == "<s><image>*8a" + "<image>" * 4  # no count left: as written


def _pairs_source(tmp_path):
    members = [("a.png", png(RED, 32)), ("a.txt", b"a red square."),
               ("c.png", png(RED, 48)), ("c.txt", b"another red square.")]
    (cfg,) = mixture_for_source(write_tar(tmp_path / "s.tar", members), "pairs").sources
    return cfg


def test_inspect_reports_the_rows_the_lm_sees_in_every_placement(tmp_path):
    """Expand writes every vision token, replace one <image> the model grows: the LM sees the same row,
    and the report gives its length (and the text's, where shorter)."""
    cfg = _pairs_source(tmp_path)
    shown = {}
    for family in ("expand", "replace"):
        model, processor = build_family(family)
        report = inspect_source(cfg, processor, counter=BadSampleCounter(max_bad_fraction=1.0), max_length=64, show=2)
        shown[family] = report.shown
    for x, y in zip(shown["expand"], shown["replace"], strict=True):
        assert (x.key, x.num_tokens, x.num_trained, x.num_images) == (y.key, y.num_tokens, y.num_trained, y.num_images)
        assert x.num_text_tokens is None and y.num_text_tokens == x.num_tokens - 15  # one <image> for 16
        assert "<image>*16[[" in x.rendered and "<image>[[" in y.rendered


def test_inspect_shows_llava_next_images_with_the_count_of_their_size(tmp_path):
    cfg = _pairs_source(tmp_path)
    model, processor = interleaf.build("tiny-llava-next", seed=0)
    samples = [s for s, _ in iter_source(cfg, processor, max_length=512)]
    report = inspect_source(cfg, processor, counter=BadSampleCounter(max_bad_fraction=1.0), max_length=512, show=2)
    assert [s.key for s in report.shown] == ["a", "c"]
    for shown, sample in zip(report.shown, samples, strict=True):
        n = sample["input_ids"].count(processor.image_token_id)  # what the processor wrote for the image
        assert f"<image>*{n}[[" in shown.rendered and shown.num_tokens == len(sample["input_ids"])
    counts = [s["input_ids"].count(processor.image_token_id) for s in samples]
    assert counts[0] != counts[1]  # the two sizes take different counts
