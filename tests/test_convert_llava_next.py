"""LLaVA-NeXT <-> interleaf: transformers' ``LlavaNextForConditionalGeneration`` is the reference.

A tiny random LLaVA-NeXT (CLIP + LLaMA, LLaVA-v1.6's five grids at the tiny tower's size;
``tests/tiny.py``) is saved in each hub key layout, converted with ``from_llava_next`` and
compared: logits at every attended position within 1e-5 and identical greedy generations on a
left-padded batch whose rows hold 0, 2 and 1 images of different aspect ratios (so different
grids, unpadding and token counts); ``to_llava_next`` gives the reference's weights back bit for
bit; what transformers' ``LlavaNextProcessor`` returns is accepted as is, and interleaf's own
processor writes the same placeholders. Each image's token count comes from the reference
(its ``get_image_features``), never from interleaf. Bad checkpoints and bad inputs are refused
with errors that name the keys or the item.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from helpers.llava import assert_cli_round_trip, assert_same_weights, save_reference
from tiny import tiny_llava_next, tiny_llava_next_processor
from transformers import LlavaNextForConditionalGeneration

import interleaf
from interleaf.convert.llava_next import from_llava_next, to_llava_next
from interleaf.errors import CheckpointError, ConfigError, InputError

# original sizes (height, width): a wide image (2x1 grid... as LLaVA-NeXT picks), a square one, a tall one
SIZES = [(30, 100), (40, 40), (120, 35)]
CASES = {
    "layer-2": dict(),
    "layers-list-tied": dict(feature_layer=[-2, -1], tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference, tok = tiny_llava_next(**CASES[request.param])
    save_reference(reference, tok, root / "next", "save_pretrained")
    from_llava_next(root / "next", root / "interleaf")
    model, processor = interleaf.load(root / "interleaf")
    return reference, model, processor, root


@torch.no_grad()
def reference_counts(reference, sizes) -> list[int]:
    """Each image's token count, as the reference model computes it."""
    s = reference.config.vision_config.image_size
    pixels = torch.zeros(len(sizes), 5, 3, s, s)
    features = reference.model.get_image_features(pixels, torch.tensor(sizes), return_dict=True).pooler_output
    return [f.shape[0] for f in features]


def batch(reference, tok, seed=0):
    """Left-padded rows with 0, 2 and 1 images; placeholders expanded as LlavaNextProcessor writes them."""
    n = reference_counts(reference, SIZES)
    image, pad = reference.config.image_token_id, tok.pad_token_id
    rows = [[1, 5, 6, 7], [1, 9] + [image] * n[0] + [10, 11] + [image] * n[1] + [12], [1] + [image] * n[2] + [13, 14]]
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    s = reference.config.vision_config.image_size
    pixels = torch.randn(3, 5, 3, s, s, generator=torch.Generator().manual_seed(seed))  # (K, max views, 3, S, S)
    return ids, mask, pixels, torch.tensor(SIZES)


def test_batch_has_different_grids(pair):
    reference, *_ = pair
    counts = reference_counts(reference, SIZES)
    assert len(set(counts)) == 3, counts  # three aspect ratios, three token counts


@torch.no_grad()
def test_logits_match_transformers_at_every_position(pair):
    reference, model, processor, _ = pair
    ids, mask, pixels, sizes = batch(reference, processor.tokenizer)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    want = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                     position_ids=positions).logits
    got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits
    assert (want - got)[mask.bool()].abs().max() <= 1e-5
    other = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.flip(1), image_sizes=sizes).logits
    assert (other - got)[1:][mask[1:].bool()].abs().max() > 1e-3  # the views matter


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 2])
def test_greedy_generation_is_identical(pair, beams):
    reference, model, processor, _ = pair
    ids, mask, pixels, sizes = batch(reference, processor.tokenizer)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=processor.pad_token_id)
    want = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, **kwargs)
    got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, **kwargs)
    assert torch.equal(want, got)


def test_round_trip_back_to_llava_next_is_bit_identical(pair, tmp_path):
    reference, _, _, root = pair
    to_llava_next(root / "interleaf", tmp_path / "back")
    back = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert_same_weights(reference, back)
    assert back.config.image_grid_pinpoints == reference.config.image_grid_pinpoints
    assert back.config.vision_feature_layer == reference.config.vision_feature_layer


@pytest.mark.parametrize("layout", ["transformers5", "llava-hf"])
@torch.no_grad()
def test_both_hub_key_layouts_load(layout, tmp_path):
    reference, tok = tiny_llava_next(seed=3)
    save_reference(reference, tok, tmp_path / "next", layout)
    keys = load_file(str(tmp_path / "next" / "model.safetensors"))
    assert ("model.image_newline" if layout == "transformers5" else "image_newline") in keys
    from_llava_next(tmp_path / "next", tmp_path / "interleaf")
    model, _ = interleaf.load(tmp_path / "interleaf")
    ids, mask, pixels, sizes = batch(reference, tok)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    want = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                     position_ids=positions).logits
    got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits
    assert (want - got)[mask.bool()].abs().max() <= 1e-5


def _images():
    return [Image.new("RGB", (100, 30), (200, 30, 30)), Image.new("RGB", (35, 120), (30, 30, 200)),
            Image.effect_noise((40, 40), 60).convert("RGB")]


@torch.no_grad()
def test_what_llava_next_processor_returns_is_accepted(pair):
    reference, model, processor, _ = pair
    hf = tiny_llava_next_processor(reference, processor.tokenizer)
    images = _images()
    texts = ["[INST] <image>\nWhat is it? [/INST]", "[INST] a question with no image [/INST]",
             "[INST] <image> and <image> [/INST]"]
    processor.tokenizer.padding_side = "left"
    inputs = hf(images=[images[0], images[1], images[2]], text=texts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].dim() == 5 and inputs["image_sizes"].shape == (3, 2)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    want = reference(**inputs, position_ids=positions).logits
    got = model(**inputs).logits
    assert (want - got)[inputs["attention_mask"].bool()].abs().max() <= 1e-5


@torch.no_grad()
def test_interleaf_processor_writes_what_llava_next_processor_writes(pair):
    reference, model, processor, _ = pair
    hf = tiny_llava_next_processor(reference, processor.tokenizer)
    images = _images()
    for image in images:
        ours = processor(["[INST] ", image, "\nWhat is it? [/INST]"], add_bos=True)
        theirs = hf(images=[image], text=["[INST] <image>\nWhat is it? [/INST]"], return_tensors="pt")
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist()
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])  # the same views, bit for bit
    # a batch with 0, 2 and 1 images of different aspect ratios, left padding: the reference agrees on it
    prompts = [["[INST] no image here [/INST]"], ["[INST] ", images[0], " and ", images[1], " [/INST]"],
               ["[INST] ", images[2], " what? [/INST]"]]
    inputs = processor(prompts, add_bos=True)
    assert inputs["pixel_values"].shape[0] == 3 and inputs["image_sizes"].shape == (3, 2)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    want = reference(input_ids=inputs["input_ids"], attention_mask=mask, pixel_values=inputs["pixel_values"],
                     image_sizes=inputs["image_sizes"], position_ids=positions).logits
    got = model(**{k: v for k, v in inputs.items() if k != "image_attention_mask"}).logits
    assert (want - got)[mask.bool()].abs().max() <= 1e-5


def test_truncation_never_cuts_an_image(pair):
    _, _, processor, _ = pair
    image = _images()[0]
    full = processor(["[INST] ", image, " what is it? [/INST]"], add_bos=True)["input_ids"][0].tolist()
    n = sum(1 for t in full if t == processor.image_token_id)
    start = full.index(processor.image_token_id)
    for budget in (start + n // 2, start + n - 1):  # budgets that end inside the image: the image goes whole
        out = processor(["[INST] ", image, " what is it? [/INST]"], add_bos=True, max_length=budget,
                        truncation=True, truncation_side="right")
        assert processor.image_token_id not in out["input_ids"][0].tolist()
        assert "pixel_values" not in out
    kept = processor(["[INST] ", image, " what is it? [/INST]"], add_bos=True, max_length=start + n,
                     truncation=True, truncation_side="right")
    assert kept["input_ids"][0].tolist() == full[: start + n] and kept["pixel_values"].shape[0] == 1
    # cutting the start: of two images of different counts, the first goes whole, the second stays whole
    other = _images()[1]
    both = processor(["a", image, "b", other, "c"], add_bos=True)["input_ids"][0].tolist()
    second = sum(1 for t in processor(["b", other, "c"])["input_ids"][0].tolist() if t == processor.image_token_id)
    budget = len(both) - both.index(processor.image_token_id) - 2  # ends inside the first image
    left = processor(["a", image, "b", other, "c"], add_bos=True, max_length=budget, truncation=True,
                     truncation_side="left")
    ids = left["input_ids"][0].tolist()
    assert sum(1 for t in ids if t == processor.image_token_id) == second != n
    assert left["image_sizes"].tolist() == [[120, 35]] and ids[0] == processor.tokenizer.bos_token_id


# -- bad input --


def test_bad_images_are_refused_by_name(pair):
    _, _, processor, _ = pair
    thin = Image.new("RGB", (2000, 2), (1, 2, 3))  # too thin for the grids
    with pytest.raises(InputError, match=r"batch row 0.*too thin for the anyres grids"):
        processor(["look: ", thin])
    processor.anyres.max_image_pixels, limit = 100, processor.anyres.max_image_pixels
    try:
        with pytest.raises(InputError, match=r"batch row 0.*larger than the anyres limit"):
            processor(["look: ", Image.new("RGB", (20, 20))])
    finally:
        processor.anyres.max_image_pixels = limit


@torch.no_grad()
def test_image_count_not_matching_placeholders_is_refused(pair):
    reference, model, processor, _ = pair
    ids, mask, pixels, sizes = batch(reference, processor.tokenizer)
    with pytest.raises(InputError, match="batch row 2 has 22 image tokens but its images take 0"):  # one image short
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:2], image_sizes=sizes[:2])
    with pytest.raises(InputError, match="image_sizes has 2 rows but pixel_values holds 3"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes[:2])
    with pytest.raises(InputError, match="needs image_sizes"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with pytest.raises(InputError, match=r"image 0: its size .* calls for 4 views .* holds 2"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, :2], image_sizes=sizes)
    no_last = ids.masked_fill((ids == model.image_token_id) & (torch.arange(3) == 2)[:, None], 13)
    with pytest.raises(InputError, match="3 images were given but the text of the batch has <image> tokens for 2"):
        model(input_ids=no_last, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    plain, _ = interleaf.build("tiny-llava", seed=0)
    with pytest.raises(InputError, match="image_sizes is for LLaVA-NeXT models"):
        plain(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.zeros(0, 3, 32, 32), image_sizes=sizes)


def test_crop_count_above_the_limit_is_refused(pair):
    _, _, processor, _ = pair
    with pytest.raises(ConfigError, match=r"anyres.grids\[2\].*above max_crops 3"):
        interleaf.config.AnyresConfig(convention="llava_next", base_size=28, patch_size=14, max_crops=3,
                                      grids=[[28, 56], [56, 28], [56, 56]])
    processor.anyres.max_crops, limit = 3, processor.anyres.max_crops  # a limit lowered after the config was read
    try:
        with pytest.raises(ConfigError, match=r"batch row 0, .* picks \[56, 56\], which has 4 crops, above max_crops 3"):
            processor(["look: ", Image.new("RGB", (40, 40))])
    finally:
        processor.anyres.max_crops = limit


# -- bad checkpoints --


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("next-bad")
    reference, tok = tiny_llava_next(seed=1)
    save_reference(reference, tok, root / "next", "save_pretrained")
    return root / "next"


def _edited(saved, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(saved, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_extra_weights_are_listed(saved, tmp_path):
    newline = next(k for k in load_file(str(saved / "model.safetensors")) if k.endswith("image_newline"))
    src = _edited(saved, tmp_path, lambda s: s.pop(newline))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): projector.image_newline"):
        from_llava_next(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"does not know \(1\): something_else"):
        from_llava_next(_edited(saved, tmp_path / "b", lambda s: s.update(something_else=torch.zeros(1))),
                        tmp_path / "out")
    extra = {"multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): projector.linear_3.weight"):
        from_llava_next(_edited(saved, tmp_path / "c", lambda s: s.update(extra)), tmp_path / "out")


def test_wrong_model_type_is_explained(saved, tmp_path):
    from tiny import tiny_llava

    reference, tok = tiny_llava()
    reference.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    with pytest.raises(CheckpointError, match="expected 'llava_next'; use `interleaf convert llava`"):
        from_llava_next(tmp_path / "llava", tmp_path / "out")
    model, processor = interleaf.build("tiny-llava", seed=0)
    interleaf.save(model, processor, tmp_path / "plain")
    with pytest.raises(ConfigError, match="insertion.anyres"):
        to_llava_next(tmp_path / "plain", tmp_path / "out")


def test_command_line_both_ways(saved, tmp_path):
    assert_cli_round_trip("llava-next", LlavaNextForConditionalGeneration, saved, tmp_path)


# -- presets --

# The released configs, written out: llava-hf/llava-v1.6-mistral-7b-hf and llava-hf/llava-v1.6-vicuna-7b-hf
# config.json (text_config as the LLM's own config.json: mistralai/Mistral-7B-Instruct-v0.2, lmsys/vicuna-7b-v1.5;
# vision_config: openai/clip-vit-large-patch14-336). Fields not written are transformers' defaults, which are
# the released values (e.g. Mistral's 32 layers and heads, hidden 4096).
RELEASED_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
RELEASED_TEXT = {
    "llava-v1.6-mistral-7b": dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                  max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                                  sliding_window=None),
    "llava-v1.6-vicuna-7b": dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096,
                                 rms_norm_eps=1e-5, pad_token_id=0),
}
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# transformers' LlavaNextForConditionalGeneration built on the meta device from the values above (computed in
# the test below, pinned here); they agree with the checkpoints' shard sizes (bf16) to 3 significant figures.
RELEASED_PARAMETERS = {"llava-v1.6-mistral-7b": 7_566_747_648, "llava-v1.6-vicuna-7b": 7_063_431_168}


@pytest.mark.parametrize("name", list(RELEASED_TEXT))
def test_llava_next_presets_have_the_released_parameter_counts(name):
    from transformers import AutoConfig, CLIPVisionConfig, LlavaNextConfig

    text = dict(RELEASED_TEXT[name])
    released = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**RELEASED_VISION), text_config=AutoConfig.for_model(text.pop("model_type"), **text),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=RELEASED_PINPOINTS, tie_word_embeddings=False)
    with torch.device("meta"):
        reference = LlavaNextForConditionalGeneration(released)
    assert reference.num_parameters() == RELEASED_PARAMETERS[name]
    model, _ = interleaf.build(name, device="meta")
    assert next(model.parameters()).is_meta
    assert model.num_parameters() == RELEASED_PARAMETERS[name]
    # the preset is what the converter makes of the released config
    from interleaf.convert.llava_next import llava_next_to_interleaf_config

    converted = llava_next_to_interleaf_config(released)
    assert model.config.insertion == converted.insertion
    assert model.config.projector == converted.projector
    assert model.config.vision_cfg.image_size == 336 and model.config.vision_cfg.image_mean == converted.vision_cfg.image_mean
    assert model.config.tokens_cfg.image_token_id == 32000
    from interleaf.presets.seeds import LLAVA_NEXT_CHAT_TEMPLATES

    assert name in LLAVA_NEXT_CHAT_TEMPLATES


@torch.no_grad()
def test_tiny_preset_end_to_end_mixed_batch():
    """tiny-llava-next: a left-padded batch of 0, 2 and 1 images of different shapes through the
    processor; greedy generation with the LM's KV cache equals re-running the whole sequence."""
    model, processor = interleaf.build("tiny-llava-next", seed=0)
    assert model.projector.image_newline.requires_grad  # trained with the projector (freeze: projector)
    with torch.no_grad():
        model.projector.image_newline.mul_(20)  # a louder newline, so that it changes the answer
    images = [Image.effect_noise((90, 40), 80).convert("RGB"), Image.effect_noise((30, 30), 80).convert("RGB"),
              Image.effect_noise((20, 70), 80).convert("RGB")]
    inputs = processor([["no image"], [images[0], "and", images[1], "?"], ["what is", images[2]]])
    assert inputs["image_sizes"].tolist() == [[40, 90], [30, 30], [70, 20]]
    counts = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert counts[0] == 0 and counts[1] > 2 * 16 and counts[2] > 16
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=processor.pad_token_id)
    ids, mask = out, torch.cat([inputs["attention_mask"], torch.ones(3, 4, dtype=torch.long)], dim=1)
    logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"],
                   image_sizes=inputs["image_sizes"]).logits
    start = inputs["input_ids"].shape[1]
    assert torch.equal(logits[:, start - 1 :].argmax(-1), ids[:, start:])
    newline = model.projector.image_newline.clone()
    model.projector.image_newline.zero_()
    changed = model(**{k: v for k, v in inputs.items() if k != "image_attention_mask"}).logits
    model.projector.image_newline.copy_(newline)
    assert (changed[1:, -1] - logits[1:, start - 1]).abs().max() > 1e-4  # the newline is used


def test_tiling_that_does_not_fit_the_tower_is_refused():
    tiles = dict(convention="llava_next", base_size=64, patch_size=8)
    with pytest.raises(ConfigError, match="insertion.anyres.base_size.*takes 32 px"):
        interleaf.build("tiny-llava-next", insertion={"anyres": tiles})
    with pytest.raises(ConfigError, match="insertion.anyres.patch_size.*drop CLIP's class token"):
        interleaf.build("tiny-llava-next", vision={"drop_cls_token": False})
    with pytest.raises(ConfigError, match="projector.kind.*resampling projector"):
        interleaf.build("tiny-llava-next", projector={"kind": "token_sampler", "token_sampler": {"depth": 1}})
