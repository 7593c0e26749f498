"""The token-insertion family: config sections, feature selection, placement, generation, freezing, bad input.

References: transformers' CLIP / SigLIP towers for the feature selection, transformers'
``LlavaForConditionalGeneration`` (``tests/tiny.py``'s ``tiny_llava``, converted with
``from_llava``) for the ``replace`` placement and generation; the ``expand`` parity itself is in
``test_convert_llava.py``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import LM_FAMILIES, tiny_clip, tiny_llava
from transformers import SiglipVisionConfig, SiglipVisionModel

import interleaf
from interleaf.config import InterleafConfig, VisionConfig
from interleaf.convert import from_llava
from interleaf.data.tokenize import tokenize_pair
from interleaf.errors import ConfigError, InputError
from interleaf.model import InsertedImages, InterleafForConditionalGeneration
from interleaf.model.loss import weighted_token_loss
from interleaf.model.token_insertion import (
    encode_rows,
    expand_image_tokens,
    logits_at_text_positions,
    replace_placement,
    text_positions,
)
from interleaf.model.vision import VisionTower
from interleaf.processing import IGNORE_INDEX

RED, BLUE = Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (30, 40), (20, 20, 220))
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=50)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(transformers reference, converted interleaf model, its processor)."""
    root = tmp_path_factory.mktemp("llava")
    reference, tok = tiny_llava(seed=5)
    reference.save_pretrained(root / "llava")
    tok.save_pretrained(root / "llava")
    from_llava(root / "llava", root / "interleaf")
    model, processor = interleaf.load(root / "interleaf")
    return reference, model, processor


@pytest.fixture(scope="module")
def tiny():
    return interleaf.build("tiny-llava", seed=0)


# -- config --


def test_cross_attention_configs_keep_their_sections_and_token_insertion_round_trips(tmp_path):
    assert "projector" not in InterleafConfig().to_dict() and "insertion" not in InterleafConfig().to_dict()
    config = InterleafConfig(
        fusion="token_insertion", projector={"kind": "linear", "bias": False}, insertion={"placement": "replace"},
        vision=dict(kind="builtin", image_size=16, patch_size=4, width=24, layers=1, heads=2),
        tokens={"prompt_format": "llava"}, text_config=LLAMA,
    )
    assert config.freeze == "projector"  # the family's default
    again = InterleafConfig(**config.to_dict())
    assert again.projector_cfg == config.projector_cfg and again.insertion_cfg == config.insertion_cfg
    config.save_pretrained(tmp_path)
    loaded = InterleafConfig.from_pretrained(tmp_path)
    assert loaded.fusion == "token_insertion" and loaded.projector == {"kind": "linear", "bias": False, "activation": "gelu",
                                                            "token_sampler": None}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(projector={"kind": "qformer"}), "projector.kind"),
        (dict(insertion={"placement": "append"}), "insertion.placement"),
        (dict(projector={"kind": "linear", "bais": True}), "projector.bais"),
        (dict(freeze="flamingo"), "freeze"),
        (dict(tokens={"prompt_format": "openflamingo"}), "tokens.prompt_format"),
        (dict(vision={"kind": "clip", "hf_config": {"num_hidden_layers": 2}, "feature_layer": [-1, 9]}),
         "vision.feature_layer"),
        (dict(vision={"kind": "clip", "hf_config": {"num_hidden_layers": 2}, "feature_layer": []}),
         "vision.feature_layer"),
    ],
)
def test_bad_token_insertion_config_names_the_field(kwargs, field):
    base = dict(fusion="token_insertion", tokens={"prompt_format": "llava"})
    with pytest.raises(ConfigError) as info:
        InterleafConfig(**{**base, **kwargs})
    assert f"'{field}'" in str(info.value)


def test_cross_attention_configs_refuse_the_token_insertion_choices():
    with pytest.raises(ConfigError, match="'freeze'.*projector"):
        InterleafConfig(freeze="projector")
    with pytest.raises(ConfigError, match="'tokens.prompt_format'.*fusion: token_insertion"):
        InterleafConfig(tokens={"prompt_format": "llava"})


@torch.no_grad()
def test_build_from_pieces_with_a_linear_projector(tmp_path):
    model, processor = interleaf.build(
        lm=dict(LLAMA, vocab_size=None), vision=dict(kind="builtin", image_size=16, patch_size=4, width=24, layers=1,
                                                     heads=2),
        fusion="token_insertion", projector={"kind": "linear"}, seed=0,
    )
    assert model.config.tokens_cfg.prompt_format == "llava" and processor.tokens.image_seq_length == 16
    assert model.config.freeze == "projector" and type(model.projector).__name__ == "LinearProjector"
    batch = processor([["a", RED, "b"], ["no image"]])
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    assert isinstance(model.prepare_media(batch["input_ids"], batch["pixel_values"]), InsertedImages)


SAMPLER = {"kind": "token_sampler", "token_sampler": {"depth": 1, "num_latents": 4, "heads": 2, "head_dim": 8}}


@torch.no_grad()
def test_token_sampler_projector_in_both_placements_gives_the_same_logits():
    expand, processor = interleaf.build("tiny-llava", projector=SAMPLER, seed=0)
    assert processor.tokens.image_seq_length == 4 and expand.projector.num_latents == 4
    replace = _replace_model(expand)
    batch = processor([["look", RED, "and", BLUE, "what"], ["text only"], [RED, "red?"]])
    image = processor.image_token_id
    rows = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    one = [[t for p, t in enumerate(row) if t != image or p == 0 or row[p - 1] != image]  # one <image> per image
           for row in rows]
    width = max(len(r) for r in one)
    ids = torch.tensor([[processor.pad_token_id] * (width - len(r)) + r for r in one])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in one])
    assert [sum(1 for t in r if t == image) for r in one] == [2, 0, 1]
    want = expand(**batch).logits
    grown = _grown_logits(replace, ids, mask, batch["pixel_values"])  # what generate runs on
    assert grown.shape == want.shape
    assert (want - grown)[batch["attention_mask"].bool()].abs().max() <= 1e-5
    # forward's logits: each of the caller's positions, an <image> the logit of its image's last vision token
    got = replace(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
    assert got.shape[:2] == ids.shape
    index = _text_index(one, 4, width, batch["input_ids"].shape[1], image)
    assert (got - want.gather(1, index[..., None].expand_as(got)))[mask.bool()].abs().max() <= 1e-5
    kwargs = dict(max_new_tokens=3, do_sample=False)
    new = expand.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(replace.generate(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                                        **kwargs)[:, width:], new)


def test_token_sampler_settings_belong_to_the_token_sampler_kind():
    with pytest.raises(ConfigError, match="'projector.token_sampler'"):
        interleaf.build("tiny-llava", projector={"kind": "linear", "token_sampler": {"depth": 1}})
    with pytest.raises(ConfigError, match="'projector.token_sampler.depth'"):
        interleaf.build("tiny-llava", projector={"kind": "token_sampler", "token_sampler": {"depth": 0}})


def test_image_seq_length_must_be_what_the_model_writes():
    with pytest.raises(ConfigError, match="tokens.image_seq_length.*16"):
        interleaf.build("tiny-llava", tokens={"image_seq_length": 5})


# -- vision features, against transformers' towers --


@torch.no_grad()
def test_clip_layers_concatenate_with_the_class_token_dropped_as_llava_does():
    clip = tiny_clip(seed=0).eval()
    cfg = VisionConfig(kind="clip", hf_config=clip.config.to_dict(), feature_layer=[-2, 0, -1], drop_cls_token=True)
    tower = VisionTower(cfg, clip)
    pixels = torch.randn(2, 3, 32, 32)
    hidden = clip(pixels, output_hidden_states=True).hidden_states
    want = torch.cat([hidden[-2][:, 1:], hidden[0][:, 1:], hidden[-1][:, 1:]], dim=-1)
    assert tower.out_dim == 3 * 32 and tower.num_tokens == cfg.num_tokens == 16
    assert torch.allclose(tower(pixels[:, None])[:, 0], want, atol=1e-6)


@torch.no_grad()
def test_siglip_last_hidden_state_is_post_layernorm():
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=32, patch_size=8)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    post = VisionTower(VisionConfig(kind="siglip", hf_config=siglip.config.to_dict(), post_layernorm=True), siglip)
    pre = VisionTower(VisionConfig(kind="siglip", hf_config=siglip.config.to_dict()), siglip)
    out = siglip(pixels, output_hidden_states=True)
    assert torch.allclose(post(pixels[:, None])[:, 0], out.last_hidden_state, atol=1e-6)
    assert torch.allclose(pre(pixels[:, None])[:, 0], out.hidden_states[-1], atol=1e-6)


# -- placement --


def test_replace_grows_each_image_token_with_exact_positions_masks_and_labels():
    I, P = 99, 0  # image and pad ids
    ids = torch.tensor([[P, P, 5, I, 6], [7, I, 8, I, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, I, 6], [7, I, 8, I, 9]])
    new_ids, new_mask, new_labels = expand_image_tokens(ids, mask, labels, [[3], [2, 1]], I, P)
    assert new_ids.tolist() == [[P, 5, I, I, I, 6], [7, I, I, 8, I, 9]]
    assert new_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, 5, -100, -100, -100, 6], [7, -100, -100, 8, -100, 9]]
    with pytest.raises(InputError, match="batch row 1 has 2 image tokens but 1 images"):
        expand_image_tokens(ids, mask, None, [[3], [2]], I, P)


def test_text_positions_point_each_image_at_its_last_vision_token():
    I, P = 99, 0
    ids = torch.tensor([[5, I, I, 6], [P, 7, I, 8]])  # right and left padding; two images back to back
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    grown_ids, grown_mask, _ = expand_image_tokens(ids, mask, None, [[2, 2], [3]], I, P)
    assert grown_ids.tolist() == [[5, I, I, I, I, 6], [P, 7, I, I, I, 8]]
    assert text_positions(ids, mask, grown_ids, grown_mask, I).tolist() == [[0, 2, 4, 5], [0, 1, 4, 5]]
    logits = torch.arange(12.0).view(2, 6, 1)
    assert logits_at_text_positions(logits, text_positions(ids, mask, grown_ids, grown_mask, I), 2)[:, :, 0].tolist() \
        == [[4.0, 5.0], [10.0, 11.0]]


def _grown_logits(model, ids, mask, pixels):
    """A ``replace`` model's logits over its grown rows: the rows grown, the images encoded, then
    the forward that generate runs (image embeddings given, nothing mapped back)."""
    grown_ids, grown_mask, _ = replace_placement(model, ids, mask, None)
    embeds = encode_rows(model, grown_ids, pixels)
    return model(input_ids=grown_ids, attention_mask=grown_mask, image_embeds=embeds).logits


def _text_index(rows, per_image, width, grown_width, image):
    """Left-padded rows with one <image> per image: each position's place in the left-padded rows
    where every image takes ``per_image`` tokens, an <image> at its image's last token."""
    index = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        grown_len = len(row) + (per_image - 1) * sum(1 for t in row if t == image)
        seen = 0
        for p, t in enumerate(row):
            seen += t == image
            index[r, width - len(row) + p] = grown_width - grown_len + p + (per_image - 1) * seen
    return index


def _replace_model(model):
    """The same weights with xGen-MM's placement: one <image> per image, grown by the model."""
    data = model.config.to_dict()
    data["insertion"] = {"placement": "replace"}
    config = InterleafConfig(**data)
    twin = InterleafForConditionalGeneration(config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@torch.no_grad()
def test_replace_placement_matches_llava_on_the_expanded_text(llava):
    reference, model, processor = llava
    twin = _replace_model(model)
    n, image, pad = reference.config.image_seq_length, reference.config.image_token_id, processor.pad_token_id
    short = [[1, 5, 6], [1, image, 9, image, 10], [1, image, 11]]
    long = [[t for i in r for t in ([i] * n if i == image else [i])] for r in short]

    def left(rows):
        width = max(len(r) for r in rows)
        return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))

    ids, mask = left(short)
    long_ids, long_mask = left(long)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = long_ids.masked_fill((long_ids == image) | (long_mask == 0), IGNORE_INDEX)
    want = reference(input_ids=long_ids, attention_mask=long_mask, pixel_values=pixels, labels=labels,
                     position_ids=(long_mask.cumsum(-1) - 1).clamp_min(0))
    short_labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    grown = _grown_logits(twin, ids, mask, pixels)
    assert grown.shape == want.logits.shape
    assert (want.logits - grown)[long_mask.bool()].abs().max() <= 1e-5
    got = twin(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=short_labels)
    assert torch.allclose(got.loss, want.loss, atol=1e-6)
    # logits at the caller's positions (an <image>: its last vision token), and the trainer's loss on
    # them with the caller's labels is the reference's loss on the expanded text
    assert got.logits.shape[:2] == ids.shape
    index = _text_index(short, n, ids.shape[1], long_ids.shape[1], image)
    assert (got.logits - want.logits.gather(1, index[..., None].expand_as(got.logits)))[mask.bool()].abs().max() <= 1e-5
    wce, _, _, count = weighted_token_loss(got.logits, short_labels.masked_fill(ids == image, IGNORE_INDEX),
                                           torch.ones(3))
    assert torch.allclose(wce.sum() / count.sum(), want.loss, atol=1e-6)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=pad)
    out = twin.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    ref = reference.generate(input_ids=long_ids, attention_mask=long_mask, pixel_values=pixels, **kwargs)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the caller's prompt, then the new tokens
    assert torch.equal(out[:, ids.shape[1]:], ref[:, long_ids.shape[1]:])


# -- batches and generation --


@pytest.mark.parametrize("family", list(LM_FAMILIES))
@torch.no_grad()
def test_every_lm_family_gives_rows_alone_the_logits_they_get_in_a_batch(family):
    model, processor = interleaf.build("tiny-llava", lm=dict(LM_FAMILIES[family], vocab_size=None), seed=0)
    prompts = [["a cat"], ["look", RED, "and", BLUE, "what"], [RED, "red?"]]
    batch = processor(prompts)
    logits = model(**batch).logits
    for r, prompt in enumerate(prompts):
        alone = processor([prompt])
        t = alone["input_ids"].shape[1]
        assert torch.allclose(model(**alone).logits[0], logits[r, -t:], atol=1e-5)
    new = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(model.generate(**processor(prompts[1:2]), max_new_tokens=3, do_sample=False)[0, -3:], new[1])


@torch.no_grad()
def test_images_are_encoded_once_per_generate_call(tiny):
    model, processor = tiny
    batch = processor([["look", RED, "and", BLUE, "what"], ["text only"], [RED, "red?"]])
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *a: calls.append(a[1][0].shape))
    try:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2)
    finally:
        handle.remove()
    assert out.shape == (3, batch["input_ids"].shape[1] + 4)
    assert calls == [torch.Size([1, 3, 3, 32, 32])]  # the batch's three images, once


@torch.no_grad()
def test_labels_are_never_trained_on_image_tokens(tiny):
    model, processor = tiny
    sample = tokenize_pair(processor, "a red square")  # the training path, through the prompt format
    image = processor.image_token_id
    assert sum(1 for t in sample.input_ids if t == image) == model.config.tokens_cfg.image_seq_length
    assert all(label == IGNORE_INDEX for t, label in zip(sample.input_ids, sample.labels) if t == image)
    batch = processor([[RED, "a red square"]], add_eos=True)
    ids = batch["input_ids"]
    raw = model(**batch, labels=ids).loss  # the model itself never takes an image token as a target
    masked = model(**batch, labels=ids.masked_fill(ids == image, IGNORE_INDEX)).loss
    assert torch.equal(raw, masked)


def test_save_and_load_give_the_same_model(tiny, tmp_path):
    model, processor = tiny
    interleaf.save(model, processor, tmp_path / "m")
    again, proc = interleaf.load(tmp_path / "m")
    batch = proc([[RED, "what?"]])
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    assert proc.tokens.image_seq_length == 16 and again.config.fusion == "token_insertion"


# -- freezing --


def _trainable(model) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def test_freeze_policies():
    model, _ = interleaf.build("tiny-llava", seed=0)
    model.apply_freeze("projector")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _trainable(model) == {"projector", "language_model"}  # the added <image> output row is in the LM
    assert all(n.startswith("projector.") or ".extra" in n for n in names)
    model.apply_freeze("projector_lm")
    assert _trainable(model) == {"projector", "language_model"}
    # the whole LM but the <image> input row, which is never read (its positions get the image's embeddings)
    lm = dict(model.language_model.named_parameters())
    assert not lm.pop("model.embed_tokens.extra").requires_grad
    assert all(p.requires_grad for p in lm.values())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    model.apply_freeze("all_trainable")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(InputError, match="'flamingo' does not apply to a 'token_insertion' model"):
        model.apply_freeze("flamingo")
    cross, _ = interleaf.build("tiny-random", seed=0)
    with pytest.raises(InputError, match="'projector' does not apply"):
        cross.apply_freeze("projector")


# -- bad input --


@pytest.fixture()
def inputs(tiny):
    model, processor = tiny
    batch = processor([["look", RED, "and", BLUE, "what"], ["text only"], [RED, "red?"]])
    return model, dict(batch)


def test_image_tokens_that_do_not_make_whole_images_name_the_row(inputs):
    model, batch = inputs
    ids = batch["input_ids"].clone()
    ids[2, (ids[2] == model.image_token_id).nonzero()[0]] = 5  # one placeholder of row 2's image lost
    with pytest.raises(InputError, match="batch row 2 has 15 image tokens, not a multiple of 16"):
        model(**{**batch, "input_ids": ids})


def test_more_images_in_the_text_than_pixels_name_the_row(inputs):
    model, batch = inputs
    pixels = batch["pixel_values"]
    with pytest.raises(InputError, match="batch row 0 names 2 images in its text but pixel_values holds 1 per row"):
        model(**{**batch, "pixel_values": pixels[:, :1]})
    flat = r"pixel_values holds 2 images but the text of the batch names 3 \(images per row: \[2, 0, 1\]\)"
    with pytest.raises(InputError, match=flat):
        model(**{**batch, "pixel_values": pixels[0]})  # LLaVA's flat layout, one image short
    with pytest.raises(InputError, match="batch row 0 has 32 image tokens but no images were given"):
        model(**{k: v for k, v in batch.items() if k != "pixel_values"})


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 2, 1, 32, 32), "3 colour channels"),
        ((3, 2, 3, 16, 16), "must be 32x32 pixels"),
        ((3, 32, 32), "must be \\(images, 3, height, width\\)"),
        ((2, 2, 3, 32, 32), "pixel_values has 2 rows but input_ids has 3"),
    ],
)
def test_wrong_pixel_shapes_are_explained(inputs, shape, message):
    model, batch = inputs
    with pytest.raises(InputError, match=message):
        model(**{**batch, "pixel_values": torch.zeros(shape)})


def test_pixels_and_embeddings_together_are_refused(inputs):
    model, batch = inputs
    with pytest.raises(InputError, match="either pixel_values or image_embeds"):
        model(**batch, image_embeds=torch.zeros(3, 32, 64))
