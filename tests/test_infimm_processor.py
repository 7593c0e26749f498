"""InfiMM's processor conventions: chat rendering, pixels, ``batch_images``, generation keywords, batches.

References: InfiMM's released processor (``processing_infimm_zephyr.py`` of Infi-MM/infimm-zephyr)
and its tokenizer files, as the reference notes record them: every image part is written
``<|endofchunk|><image>`` in place, a system message with empty content is put first when the
conversation has none, then Zephyr's chat template (the text below, from its
``tokenizer_config.json``); images are ``Resize(336, bicubic)`` on the shortest edge, then
``CenterCrop(336)``, ``ToTensor``, ``Normalize`` with OpenAI CLIP's mean and std (torchvision's
transforms, whose size and crop arithmetic :func:`torchvision_style_pixels` writes out with PIL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.infimm import ZEPHYR_TEMPLATE, zephyr_like_tokenizer
from PIL import Image
from tiny import tiny_preset

from interleaf.config import TokensConfig
from interleaf.errors import ConfigError
from interleaf.processing import ImageTransform, InterleafProcessor

# The reference notes' rendering of the model card's one-image conversation.
ZEPHYR_CARD_PROMPT = (
    "<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>Please explain this image to me.</s>\n<|assistant|>\n"
)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
S = 336


def infimm_processor(tok=None, size: int = S) -> InterleafProcessor:
    """A processor with InfiMM's conventions: ``batch_images``, an empty system turn, CLIP pixels."""
    tok = tok if tok is not None else zephyr_like_tokenizer()
    transform = ImageTransform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize="shortest_edge_crop")
    return InterleafProcessor(tok, TokensConfig(prompt_format="openflamingo"), transform,
                              images_key="batch_images", default_system="")


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def torchvision_style_pixels(img: Image.Image, s: int = S) -> torch.Tensor:
    """``Resize(s)`` + ``CenterCrop(s)`` + ``ToTensor`` + ``Normalize`` as torchvision computes them on a
    PIL image: the long side becomes ``int(s * long / short)`` (truncated), the crop starts at
    ``int(round((side - s) / 2.0))``, bicubic resampling is Pillow's own."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_w, new_h = (s, int(s * long / short)) if w <= h else (int(s * long / short), s)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
    img = img.crop((left, top, left + s, top + s)).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


# -- chat rendering --


def test_the_model_cards_conversation_is_rendered_as_infimm_renders_it():
    tok = zephyr_like_tokenizer()
    processor = infimm_processor(tok)
    chat = [{"role": "user", "content": [{"image": noise(40, 30)}, "Please explain this image to me."]}]
    out = processor(chat)
    # InfiMM: tokenizer([apply_chat_template(messages)]) with the tokenizer's BOS first
    assert out["input_ids"][0].tolist() == tok([ZEPHYR_CARD_PROMPT])["input_ids"][0]
    assert tok.decode(out["input_ids"][0]) == "<s>" + ZEPHYR_CARD_PROMPT
    assert out["batch_images"].shape == (1, 1, 1, 3, S, S)


def test_every_turn_is_written_once_with_images_in_place():
    tok = zephyr_like_tokenizer()
    chat = [
        {"role": "user", "content": [{"image": noise(30, 30, 1)}, "What is this?", {"image": noise(30, 40, 2)}]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": ["And now?", {"image": noise(50, 30, 3)}]},
    ]
    text = tok.decode(infimm_processor(tok)(chat)["input_ids"][0])
    # InfiMM's own processor would append "Two pictures." a second time, as a user turn: not here
    assert text == (
        "<s><|system|>\n</s>\n<|user|>\n<|endofchunk|><image>What is this?<|endofchunk|><image></s>\n"
        "<|assistant|>\nTwo pictures.</s>\n<|user|>\nAnd now?<|endofchunk|><image></s>\n<|assistant|>\n"
    )
    assert text.count("Two pictures.") == 1


def test_a_system_message_of_the_users_is_kept_and_no_empty_one_is_added():
    tok = zephyr_like_tokenizer()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"image": noise(20, 20)}, "Hi"]}]
    text = tok.decode(infimm_processor(tok)(chat)["input_ids"][0])
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\n<|endofchunk|><image>Hi</s>\n<|assistant|>\n"


def test_without_default_system_nothing_is_added_and_plain_prompts_are_untouched():
    tok = zephyr_like_tokenizer()
    transform = ImageTransform(8, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    plain = InterleafProcessor(tok, TokensConfig(prompt_format="openflamingo"), transform)
    chat = [{"role": "user", "content": [{"image": noise(20, 20)}, "Hi"]}]
    assert tok.decode(plain(chat)["input_ids"][0]) == "<s><|user|>\n<|endofchunk|><image>Hi</s>\n<|assistant|>\n"
    infimm = infimm_processor(tok, size=8)
    prompt = [noise(20, 20), "A caption"]  # not a conversation: no template, no system turn
    written = tok.decode(infimm(prompt)["input_ids"][0])
    assert written == tok.decode(plain(prompt)["input_ids"][0]) == "<s><image>A caption"


def test_default_system_must_be_a_string():
    tok = zephyr_like_tokenizer()
    with pytest.raises(ConfigError, match="default_system"):
        InterleafProcessor(tok, TokensConfig(), ImageTransform(8, (0.5,) * 3, (0.5,) * 3), default_system=0)


def test_default_system_and_images_key_survive_save_and_load(tmp_path):
    processor = infimm_processor(size=8)
    processor.save_pretrained(tmp_path)
    loaded = InterleafProcessor.from_pretrained(tmp_path)
    assert loaded.default_system == "" and loaded.images_key == "batch_images"
    chat = [{"role": "user", "content": [{"image": noise(20, 20)}, "Hi"]}]
    assert torch.equal(loaded(chat)["input_ids"], processor(chat)["input_ids"])
    assert InterleafProcessor.from_pretrained(tmp_path, default_system=None).default_system is None


# -- pixels --


@pytest.mark.parametrize("size", [(40, 30), (30, 45), (405, 300), (336, 500), (336, 336), (1000, 333)])
def test_pixels_are_torchvisions_resize_and_centre_crop_with_clip_normalisation(size):
    img = noise(*size, seed=sum(size))
    out = infimm_processor()([{"role": "user", "content": [{"image": img}, "x"]}])
    got = out["batch_images"][0, 0, 0]
    torch.testing.assert_close(got, torchvision_style_pixels(img), rtol=0, atol=1e-6)


def test_batch_images_are_shaped_as_infimm_returns_them_and_padded_with_zeros():
    processor = infimm_processor(size=8)
    rows = [
        [{"role": "user", "content": [{"image": noise(9, 9, 1)}, "a", {"image": noise(9, 9, 2)}]}],
        [{"role": "user", "content": ["no image here"]}],
        [{"role": "user", "content": [{"image": noise(9, 9, 3)}, "b"]}],
    ]
    out = processor(rows)
    images = out["batch_images"]
    assert images.shape == (3, 2, 1, 3, 8, 8) and "pixel_values" not in out
    assert torch.equal(images[0, 1, 0], torchvision_style_pixels(noise(9, 9, 2), 8))
    assert not images[1].any() and not images[2, 1].any()


def test_a_batch_without_images_still_gets_batch_images_which_no_token_points_at():
    processor = infimm_processor(size=8)
    out = processor([[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hi there"}]])
    assert out["batch_images"].shape == (2, 1, 1, 3, 8, 8) and not out["batch_images"].any()
    assert not (out["input_ids"] == processor.image_token_id).any()
    assert out["image_attention_mask"].shape[-1] == 0


# -- the model with InfiMM's inputs --


@pytest.fixture(scope="module")
def infimm_style_model():
    """The tiny cross-attention preset, its processor given InfiMM's conventions (open gates, loud resampler)."""
    model, processor = tiny_preset(seed=3, gates=1.0, resampler_scale=10.0)
    processor.tokenizer.chat_template = ZEPHYR_TEMPLATE
    processor.images_key, processor.default_system = "batch_images", ""
    return model, processor


def solid(rgb, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def _conversations():
    return [
        [{"role": "user", "content": [{"image": solid((0, 0, 0))}, "Describe.", {"image": solid((255, 255, 255))}]}],
        [{"role": "user", "content": ["A question without a picture, longer than the others."]}],
        [{"role": "user", "content": ["Look:", {"image": noise(35, 35, 3)}]},
         {"role": "assistant", "content": "Seen."},
         {"role": "user", "content": ["Again?"]}],
    ]


@torch.no_grad()
def test_generation_keywords_are_infimms_and_map_to_new_token_counts(infimm_style_model):
    model, processor = infimm_style_model
    inputs = processor(_conversations()[:1])
    free = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    stop = int(free[0, inputs["input_ids"].shape[1]])  # the first token it generates, made its EOS
    ours = model.generate(**inputs, min_generation_length=3, max_generation_length=5, do_sample=False,
                          eos_token_id=stop)
    theirs = model.generate(**inputs, min_new_tokens=3, max_new_tokens=5, do_sample=False, eos_token_id=stop)
    assert torch.equal(ours, theirs)
    new = ours[0, inputs["input_ids"].shape[1]:].tolist()
    assert 3 <= len(new) <= 5 and stop not in new[:3]  # the minimum held the EOS back
    capped = model.generate(**inputs, max_generation_length=2, do_sample=False)
    assert capped.shape[1] == inputs["input_ids"].shape[1] + 2


@torch.no_grad()
def test_a_batch_of_three_with_different_image_counts_generates_each_rows_tokens_alone(infimm_style_model):
    model, processor = infimm_style_model
    rows = _conversations()
    batch = processor(rows)
    assert batch["batch_images"].shape[:3] == (3, 2, 1)
    together = model.generate(**batch, min_generation_length=0, max_generation_length=6, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        alone = processor([row])
        want = model.generate(**alone, min_generation_length=0, max_generation_length=6, do_sample=False)
        assert together[r, prompt_len:].tolist() == want[0, alone["input_ids"].shape[1]:].tolist(), r
    # the images matter: other pictures in row 0 change its answer
    swapped = processor([[{"role": "user", "content": [{"image": solid((255, 0, 0))}, "Describe.",
                                                        {"image": solid((0, 0, 255))}]}]])
    other = model.generate(**swapped, max_generation_length=6, do_sample=False)
    assert other[0, swapped["input_ids"].shape[1]:].tolist() != together[0, prompt_len:].tolist()
