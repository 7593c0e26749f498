"""Placement ``replace`` (xGen-MM): one ``<image>`` token in the text becomes the image's embeddings in
the model, so the row the LM sees is longer than the text. Training measures that row: the samples'
``lm_length`` (checked against the model's own grown rows), ``max_length`` (cut as the ``expand``
placement cuts the same LM row), and ``tokens_seen`` (the same as an ``expand`` run on the same data,
whose text already holds every position).
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers.families import build_family, stage_model

import interleaf
from interleaf.config import InterleafConfig
from interleaf.data.collate import collate
from interleaf.data.stream import MixtureStream
from interleaf.errors import ConfigError
from interleaf.training import train

VISION_TOKENS = 16  # tiny-llava's CLIP: 32 px in patches of 8, the class token dropped


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    return synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)


def _mixture(corpus, max_length: int | None = None) -> dict:
    sources = [
        {"name": "pairs", "format": "pairs", "paths": str(corpus / "pairs" / "*.tar"), "weight": 1},
        {"name": "docs", "format": "interleaved", "paths": str(corpus / "interleaved" / "*.tar"), "weight": 1},
        {"name": "vqa", "format": "llava", "paths": str(corpus / "llava" / "vqa_train.json"),
         "images_root": str(corpus / "images"), "weight": 1},
    ]
    return {"sources": sources, "seed": 3, "max_bad_fraction": 1.0, **({"max_length": max_length} if max_length else {})}


def test_the_config_fills_in_what_an_image_becomes():
    expand, _ = build_family("expand")
    replace, processor = build_family("replace")
    assert expand.config.tokens_cfg.image_lm_length is None
    assert replace.config.tokens_cfg.image_lm_length == VISION_TOKENS == processor.tokens.image_lm_length
    assert processor.format.grows_images and processor.format.lm_token_count() == VISION_TOKENS
    again = InterleafConfig.from_dict(replace.config.to_dict())
    assert again.tokens_cfg.image_lm_length == VISION_TOKENS
    # derived, never taken from the input: a config edited after it was written stays consistent
    data = replace.config.to_dict()
    data["tokens"]["image_lm_length"] = 5
    assert InterleafConfig.from_dict(data).tokens_cfg.image_lm_length == VISION_TOKENS
    data["projector"] = {"kind": "token_sampler", "token_sampler": {"depth": 1, "num_latents": 3, "heads": 2,
                                                                      "head_dim": 8}}
    assert InterleafConfig.from_dict(data).tokens_cfg.image_lm_length == 3
    data = expand.config.to_dict()
    data["tokens"]["image_lm_length"] = 16
    assert InterleafConfig.from_dict(data).tokens_cfg.image_lm_length is None
    with pytest.raises(ConfigError, match="tokens.image_lm_length"):  # a bad value is still a bad value
        InterleafConfig.from_dict({**data, "tokens": {**data["tokens"], "image_lm_length": 0}})


def test_the_lm_length_of_every_sample_is_the_row_the_model_grows(corpus):
    model, processor = build_family("replace")
    samples = MixtureStream(_mixture(corpus), processor).take(12)
    assert max(len(s["images"]) for s in samples) > 1  # documents with several images among them
    batch = collate(samples, processor.pad_token_id)
    with torch.no_grad():
        media = model.prepare_media(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    assert batch["lm_lengths"].tolist() == media.grown_mask.sum(-1).tolist()
    assert (batch["lm_lengths"] > batch["attention_mask"].sum(-1)).all()


def test_expand_rows_are_their_text(corpus):
    _, processor = build_family("expand")
    batch = collate(MixtureStream(_mixture(corpus), processor).take(6), processor.pad_token_id)
    assert batch["lm_lengths"].tolist() == batch["attention_mask"].sum(-1).tolist()


def _text(sample: dict, image_id: int) -> tuple[list[int], list[int]]:
    """A sample's tokens and labels without its image tokens."""
    kept = [(t, label) for t, label in zip(sample["input_ids"], sample["labels"]) if t != image_id]
    return [t for t, _ in kept], [label for _, label in kept]


@pytest.mark.parametrize("max_length", [56, 64, 100])
def test_max_length_cuts_the_grown_row_as_expand_cuts_the_same_row(corpus, max_length):
    """Both placements give the LM the same row, so a cut keeps the same text and the same whole images,
    and a sample left with nothing to train is skipped by both."""
    _, expand = build_family("expand")
    model, replace = build_family("replace")
    a = MixtureStream(_mixture(corpus, max_length), expand)
    b = MixtureStream(_mixture(corpus, max_length), replace)
    xs, ys = a.take(16), b.take(16)
    assert a.bad.to_dict() == b.bad.to_dict()
    for x, y in zip(xs, ys):
        assert x["key"] == y["key"]
        assert y["lm_length"] == x["lm_length"] == len(x["input_ids"]) <= max_length
        assert len(y["images"]) == len(x["images"]) == y["input_ids"].count(replace.image_token_id)
        assert _text(x, expand.image_token_id) == _text(y, replace.image_token_id)
    cut = [y for y in ys if y["lm_length"] > len(y["input_ids"]) and len(y["input_ids"]) < max_length]
    if max_length <= 64:
        assert cut  # rows whose text fits but whose grown row would not were cut
    with torch.no_grad():  # and the model's own row is what the sample says
        batch = collate(ys, replace.pad_token_id)
        if "pixel_values" in batch:
            media = model.prepare_media(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
            assert media.grown_mask.sum(-1).max() <= max_length


def _stale_replace_model(path):
    """A saved replace model whose processor_config.json predates ``tokens.image_lm_length``."""
    model, processor = build_family("replace")
    interleaf.save(model, processor, path)
    data = json.loads((path / "processor_config.json").read_text())
    del data["tokens"]["image_lm_length"]
    (path / "processor_config.json").write_text(json.dumps(data))
    assert interleaf.load(path)[1].tokens.image_lm_length is None
    return path


@pytest.mark.parametrize("saved", [False, True])
def test_tokens_seen_counts_the_positions_the_lm_sees(corpus, tmp_path, saved):
    """``saved``: the replace model comes from a directory whose processor lacks the length; training
    takes it from the model."""
    summaries = {}
    for family in ("expand", "replace"):
        model = {"path": str(_stale_replace_model(tmp_path / "m"))} if saved and family == "replace" else None
        stage = {
            "model": model or stage_model(family), "data": _mixture(corpus, 64),
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
            "batch_size": 4, "max_steps": 2, "log_every": 1, "out": str(tmp_path / family), "freeze": "projector",
        }
        train(stage, progress=False)
        summaries[family] = json.loads((tmp_path / family / "summary.json").read_text())
        logged = [json.loads(line) for line in (tmp_path / family / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["tokens_seen"] == summaries[family]["tokens_seen"]
    expand, replace = summaries["expand"], summaries["replace"]
    assert replace["tokens_seen"] == expand["tokens_seen"] > 0
    assert replace["trained_tokens_seen"] == expand["trained_tokens_seen"] > 0
    # against the text alone: the same samples read again, their text tokens fewer than the LM's
    _, processor = build_family("replace")
    samples = MixtureStream(_mixture(corpus, 64), processor, seed=0).take(8)
    assert sum(s["lm_length"] for s in samples) > sum(len(s["input_ids"]) for s in samples)


def test_a_saved_processor_keeps_the_length(tmp_path):
    model, processor = build_family("replace")
    interleaf.save(model, processor, tmp_path / "m")
    _, again = interleaf.load(tmp_path / "m")
    assert again.tokens.image_lm_length == VISION_TOKENS


def test_under_xgenmm_tiling_an_image_takes_its_views_of_latents():
    """xGen-MM r-v1.5 (128 latents per view): the public code's views for these sizes (W, H) are 5, 4, 4 and
    3, so the images take 640, 512, 512 and 384 positions (the reference notes' test vectors)."""
    from interleaf.config import AnyresConfig, TokensConfig
    from interleaf.processing import build_tiny_tokenizer
    from interleaf.processing.prompt_format import PromptFormat

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fmt = PromptFormat(tokenizer, TokensConfig(prompt_format="llava", image_lm_length=128),
                       AnyresConfig(convention="xgenmm", base_size=384, patch_size=14))
    assert fmt.lm_sized_images and fmt.image_token_count() == 1
    assert [fmt.lm_token_count(size) for size in [(640, 480), (1024, 256), (300, 900), (384, 384)]] == [640, 512, 512, 384]
