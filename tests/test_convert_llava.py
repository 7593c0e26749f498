"""LLaVA <-> interleaf: transformers' ``LlavaForConditionalGeneration`` is the reference.

A tiny random LLaVA (CLIP + LLaMA, ``tests/tiny.py``) is saved in each hub key layout, converted
with ``from_llava`` and compared: logits at every attended position within 1e-5 and identical
greedy generations on a left-padded batch whose rows hold 0, 1 and 2 images; ``to_llava`` gives
the reference's weights back bit for bit; what transformers' ``LlavaProcessor`` returns is
accepted as is. Bad checkpoints are refused with errors that list the keys.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers.llava import assert_cli_round_trip, assert_same_weights, save_reference
from tiny import tiny_llava
from transformers import LlavaForConditionalGeneration

import interleaf
from interleaf.convert import from_llava, to_llava
from interleaf.errors import CheckpointError, ConfigError

CASES = {
    "default-layer-2": dict(),
    "full-layers-list-no-bias": dict(feature_layer=[-2, -1], strategy="full", projector_bias=False),
    "first-layer-tied": dict(feature_layer=1, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference, tok = tiny_llava(**CASES[request.param])
    save_reference(reference, tok, root / "llava", "save_pretrained")
    from_llava(root / "llava", root / "interleaf")
    model, processor = interleaf.load(root / "interleaf")
    return reference, model, processor, root


def batch(reference, tok, seed=0):
    """Left-padded rows with 0, 2 and 1 images (placeholders expanded as LlavaProcessor writes them)."""
    n = reference.config.image_seq_length
    image, pad = reference.config.image_token_id, tok.pad_token_id
    rows = [[1, 5, 6, 7], [1, 9] + [image] * n + [10, 11] + [image] * n + [12], [1] + [image] * n + [13, 14, 15]]
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    size = reference.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))  # LLaVA's flat layout
    return ids, mask, pixels


@torch.no_grad()
def test_logits_match_transformers_at_every_position(pair):
    reference, model, processor, _ = pair
    ids, mask, pixels = batch(reference, processor.tokenizer)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate passes; forward gets the same here
    want = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (want - got)[mask.bool()].abs().max() <= 1e-5
    other = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.flip(0)).logits  # images matter
    assert (other - got)[1:][mask[1:].bool()].abs().max() > 1e-3


@torch.no_grad()
def test_interleaf_pixel_layout_gives_the_same_logits(pair):
    reference, model, processor, _ = pair
    ids, mask, pixels = batch(reference, processor.tokenizer)
    padded = torch.zeros(3, 2, *pixels.shape[1:])  # (B, N, 3, H, W): row 0 none, row 1 two, row 2 one
    padded[1, :2], padded[2, 0] = pixels[:2], pixels[2]
    flat = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=padded).logits, flat)


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 2])
def test_greedy_generation_is_identical(pair, beams):
    reference, model, processor, _ = pair
    ids, mask, pixels = batch(reference, processor.tokenizer)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=processor.pad_token_id)
    want = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert torch.equal(want, got)


def test_round_trip_back_to_llava_is_bit_identical(pair, tmp_path):
    reference, _, _, root = pair
    to_llava(root / "interleaf", tmp_path / "back")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert_same_weights(reference, back)
    assert back.config.vision_feature_layer == reference.config.vision_feature_layer
    assert back.config.vision_feature_select_strategy == reference.config.vision_feature_select_strategy


@pytest.mark.parametrize("layout", ["transformers5", "llava-hf"])
@torch.no_grad()
def test_both_hub_key_layouts_load(layout, tmp_path):
    reference, tok = tiny_llava(seed=3)
    save_reference(reference, tok, tmp_path / "llava", layout)
    assert any(k.startswith("model.language_model." if layout == "transformers5" else "language_model.model.")
               for k in load_file(str(tmp_path / "llava" / "model.safetensors")))
    from_llava(tmp_path / "llava", tmp_path / "interleaf")
    model, processor = interleaf.load(tmp_path / "interleaf")
    ids, mask, pixels = batch(reference, tok)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    want = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (want - got)[mask.bool()].abs().max() <= 1e-5


@torch.no_grad()
def test_what_llava_processor_returns_is_accepted(pair):
    from PIL import Image
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    reference, model, processor, _ = pair
    cfg = reference.config
    size = cfg.vision_config.image_size
    hf = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=processor.tokenizer, patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (30, 30, 200))]
    texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: a question with no image ASSISTANT:",
             "USER: <image> and <image> ASSISTANT:"]
    processor.tokenizer.padding_side = "left"
    inputs = hf(images=[images[0], images[0], images[1]], text=texts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].dim() == 4  # LLaVA's flat layout
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    want = reference(**inputs, position_ids=positions).logits
    got = model(**inputs).logits
    assert (want - got)[inputs["attention_mask"].bool()].abs().max() <= 1e-5
    # interleaf's own processor writes the same expanded placeholders for the same prompt
    ours = processor(["USER: ", images[0], "\nWhat is it? ASSISTANT:"], add_bos=True)["input_ids"][0].tolist()
    theirs = hf(images=[images[0]], text=texts[:1], return_tensors="pt")["input_ids"][0].tolist()
    assert ours == theirs


# -- bad checkpoints --


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-bad")
    reference, tok = tiny_llava(seed=1)
    save_reference(reference, tok, root / "llava", "save_pretrained")
    return root / "llava"


def _edited(saved, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(saved, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_weights_are_listed(saved, tmp_path):
    src = _edited(saved, tmp_path, lambda s: s.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): projector.linear_2.bias"):
        from_llava(src, tmp_path / "out")


def test_unknown_and_unexpected_weights_are_listed(saved, tmp_path):
    def edit(state):
        state["image_newline"] = torch.zeros(4)  # a LLaVA-NeXT key: this is not a LLaVA checkpoint
        state["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)

    src = _edited(saved, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        from_llava(src, tmp_path / "out")
    assert "image_newline" in str(info.value)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): projector.linear_3.weight"):
        extra = {"multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}
        from_llava(_edited(saved, tmp_path / "b", lambda s: s.update(extra)), tmp_path / "out")


def test_missing_tokenizer_and_wrong_model_type_are_explained(saved, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved / name, bare / name)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        from_llava(bare, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a LLaVA save_pretrained directory"):
        from_llava(tmp_path / "nowhere", tmp_path / "out")


def test_cross_attention_model_cannot_go_to_llava(tmp_path):
    model, processor = interleaf.build("tiny-random", seed=0)
    interleaf.save(model, processor, tmp_path / "xattn")
    with pytest.raises(ConfigError, match="fusion"):
        to_llava(tmp_path / "xattn", tmp_path / "out")


def test_command_line_both_ways(saved, tmp_path):
    assert_cli_round_trip("llava", LlavaForConditionalGeneration, saved, tmp_path)
