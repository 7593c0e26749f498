"""The tiny tokenizer and the processor: prompt formats, padding, masks, chat, errors, save/load."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from interleaf.config import TokensConfig
from interleaf.errors import CheckpointError, ConfigError, InputError, OfflineError
from interleaf.processing import ImageTransform, InterleafProcessor, build_tiny_tokenizer

S = 8
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(rgb, size=(10, 12)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def make_processor(fmt: str = "openflamingo", add_eou: bool = False, **kwargs) -> InterleafProcessor:
    tokens = TokensConfig(prompt_format=fmt, add_end_of_utterance=add_eou)
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tokens.required_tokens()})
    transform = ImageTransform(S, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="squash")
    return InterleafProcessor(tok, tokens, transform, **kwargs)


def reference_image_mask(ids: torch.Tensor, image_id: int, n: int) -> torch.Tensor:
    """Brute force: each token -> its latest image at or before it (none before the first)."""
    out = torch.zeros(*ids.shape, n, dtype=torch.long)
    for b in range(ids.shape[0]):
        latest = -1
        for t in range(ids.shape[1]):
            if ids[b, t] == image_id:
                latest += 1
            if latest >= 0:
                out[b, t, latest] = 1
    return out


def colour_of(pixels: torch.Tensor) -> tuple[int, ...]:
    """(3, S, S) normalised with mean=std=0.5 -> the RGB of its first pixel."""
    return tuple(int(round(v)) for v in ((pixels[:, 0, 0] * 0.5 + 0.5) * 255).tolist())


# -- the tiny tokenizer --


def test_tiny_tokenizer_round_trips_unicode_and_adds_bos(no_network):
    tok = build_tiny_tokenizer()  # trained here on built-in text: nothing is fetched
    assert no_network == []
    for text in ["Héllo wörld", "猫が好き 🐱🐶", "tabs\tand\nnewlines  ", "∑ x² → ∞", ""]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == ["<s>", "</s>", "<pad>", "<unk>"]
    assert len(tok) <= 512


def test_tiny_tokenizer_is_deterministic_and_trainable_on_text():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    custom = build_tiny_tokenizer("zebra zebra zebra quagga " * 20, vocab_size=300)
    assert len(custom) <= 300
    assert len(custom("zebra", add_special_tokens=False)["input_ids"]) < len(a("zebra", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(vocab_size=100)


def test_chat_template_marks_assistant_tokens():
    tok = build_tiny_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "A red cat."},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "A dog."},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tok.bos_token_id
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked == "A red cat.</s>A dog.</s>"
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What is this?</s>\n<|assistant|>\n")
    assert not tok.apply_chat_template(msgs[:2], tokenize=False).endswith("<|assistant|>\n")


# -- prompt formats --


def test_openflamingo_batch_with_different_image_counts():
    proc = make_processor("openflamingo")
    out = proc([["A", solid(RED), "red<|endofchunk|>", solid(GREEN), "green"], ["only text"], [solid(BLUE), "blue"]])
    texts = proc.tokenizer.batch_decode(out["input_ids"], skip_special_tokens=False)
    assert texts[0] == "<s>A<image>red<|endofchunk|><image>green"
    assert texts[2].endswith("<s><image>blue") and texts[2].startswith("<pad>")
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].shape == out["input_ids"].shape
    px = out["pixel_values"]
    assert px.shape == (3, 2, 3, S, S) and px.dtype == torch.float32
    assert colour_of(px[0, 0]) == RED and colour_of(px[0, 1]) == GREEN and colour_of(px[2, 0]) == BLUE
    assert px[1].abs().sum() == 0 and px[2, 1].abs().sum() == 0  # zero padding for missing images
    mask = out["image_attention_mask"]
    assert mask.shape == (3, out["input_ids"].shape[1], 2) and mask.dtype == torch.long
    assert torch.equal(mask, reference_image_mask(out["input_ids"], proc.image_token_id, 2))


def test_left_and_right_padding():
    proc = make_processor()
    prompts = [["short", solid(RED)], ["a much longer prompt with", solid(RED), "more words after it"]]
    left = proc(prompts)
    right = proc(prompts, padding_side="right")
    n = int(left["attention_mask"][0].sum())
    t = left["input_ids"].shape[1]
    assert n < t
    assert left["attention_mask"][0, : t - n].sum() == 0 and left["attention_mask"][0, t - n :].all()
    assert right["attention_mask"][0, :n].all() and right["attention_mask"][0, n:].sum() == 0
    assert torch.equal(left["input_ids"][0, t - n :], right["input_ids"][0, :n])
    assert (left["input_ids"][0, : t - n] == proc.pad_token_id).all()
    for out in (left, right):
        assert torch.equal(out["image_attention_mask"], reference_image_mask(out["input_ids"], proc.image_token_id, 1))
    padded = proc(prompts, padding="max_length", max_length=t + 3)
    assert padded["input_ids"].shape == (2, t + 3)


def test_idefics_format_shares_fake_tokens():
    proc = make_processor("idefics")
    out = proc(["User: look ", solid(RED), solid(GREEN), "two images", solid(BLUE)])
    text = proc.tokenizer.decode(out["input_ids"][0], skip_special_tokens=False)
    f = "<fake_token_around_image>"
    assert text == f"<s>User: look{f}<image>{f}<image>{f}two images{f}<image>{f}"
    assert out["pixel_values"].shape == (1, 3, 3, S, S)
    assert [colour_of(out["pixel_values"][0, i]) for i in range(3)] == [RED, GREEN, BLUE]


def test_idefics_end_of_utterance_between_texts():
    proc = make_processor("idefics", add_eou=True)
    ids = proc(["User: hi", "Assistant:"])["input_ids"][0]
    assert proc.decode(ids, skip_special_tokens=False) == "<s>User: hi<end_of_utterance>Assistant:"
    ids = proc(["User: hi", "Assistant:"], add_end_of_utterance_token=False)["input_ids"][0]
    assert proc.decode(ids, skip_special_tokens=False) == "<s>User: hiAssistant:"


def test_idefics_parity_with_transformers():
    from transformers import IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    proc = make_processor("idefics", add_eou=True)
    image_processor = IdeficsImageProcessorPil(image_size=S, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    reference = IdeficsProcessor(image_processor, proc.tokenizer)
    prompts = [
        ["User: hi ", solid(RED), solid(BLUE), " a cat</s>", "more", solid(GREEN), "x"],
        ["x", solid(RED), "y"],
        ["User:", "no image", "Assistant:"],
    ]
    for side in ("left", "right"):
        proc.tokenizer.padding_side = side
        for eou in (False, True):
            ours = proc(prompts, padding_side=side, add_end_of_utterance_token=eou)
            theirs = reference(text=prompts, add_end_of_utterance_token=eou, return_tensors="pt")
            for key in ("input_ids", "attention_mask", "image_attention_mask"):
                assert torch.equal(ours[key], theirs[key].long()), (side, eou, key)
            torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])


def test_idefics_mask_resets_after_eos():
    proc = make_processor("idefics")
    out = proc([solid(RED), "a caption</s>", "next document"])
    ids, mask = out["input_ids"][0], out["image_attention_mask"][0, :, 0]
    eos = (ids == proc.tokenizer.eos_token_id).nonzero()[0, 0]
    assert mask[: eos + 1].sum() > 0 and mask[eos + 1 :].sum() == 0


def test_batch_without_images():
    out = make_processor()([["hello"], ["world, longer"]])
    assert "pixel_values" not in out
    assert out["image_attention_mask"].shape == (*out["input_ids"].shape, 0)


# -- chat messages --


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_messages_with_images(tmp_path):
    solid(RED).save(tmp_path / "red.png")
    proc = make_processor("openflamingo")
    infimm_style = [{"role": "user", "content": [{"image": "red.png"}, "What colour?"]}]
    openai_style = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": _data_url(solid(GREEN))}},
            {"type": "image", "image": solid(BLUE)},
        ]},
        {"role": "assistant", "content": "Green and blue."},
        {"role": "user", "content": "Sure?"},
    ]
    out = proc([infimm_style, openai_style], images_root=tmp_path)
    texts = proc.tokenizer.batch_decode(out["input_ids"], skip_special_tokens=False)
    assert texts[0].endswith("<s><|user|>\n<|endofchunk|><image>What colour?</s>\n<|assistant|>\n")
    assert "<|user|>\nCompare<|endofchunk|><image><|endofchunk|><image></s>\n<|assistant|>\nGreen and blue.</s>" in texts[1]
    assert texts[1].count("<s>") == 1  # the template's BOS is not doubled
    px = out["pixel_values"]
    assert colour_of(px[0, 0]) == RED and colour_of(px[1, 0]) == GREEN and colour_of(px[1, 1]) == BLUE
    assert torch.equal(out["image_attention_mask"], reference_image_mask(out["input_ids"], proc.image_token_id, 2))


def test_chat_in_idefics_format_keeps_images_across_turns():
    proc = make_processor("idefics")
    chat = [
        {"role": "user", "content": [{"image": solid(RED)}, {"image": solid(BLUE)}, "Colours?"]},
        {"role": "assistant", "content": "Red, blue."},
        {"role": "user", "content": "Sure?"},
    ]
    out = proc(chat)
    f = "<fake_token_around_image>"
    assert f"{f}<image>{f}<image>{f}Colours?" in proc.decode(out["input_ids"][0], skip_special_tokens=False)
    # Turns end with EOS; in a chat the last image stays visible to the later turns.
    assert out["image_attention_mask"][0, -1, 1] == 1
    single = proc(chat)
    assert torch.equal(single["input_ids"], proc([chat])["input_ids"])  # one conversation == a batch of one


# -- errors --


@pytest.mark.parametrize(
    "prompts, needles",
    [
        ([["ok"], ["  ", ""]], ["batch row 1", "empty"]),
        ([["text", 3.5]], ["batch row 0, prompt item 1", "float", "PIL.Image.Image"]),
        ([["text", {"foo": 1}]], ["batch row 0, prompt item 1", "['foo']"]),
        ([["see <image> here"]], ["batch row 0, prompt item 0", "'<image>'", "passed as images"]),
        ([[{"role": "user", "content": "what is <image>?"}]], ["batch row 0, message 0, part 0", "literally"]),
        ([[{"role": "robot", "content": "hi"}]], ["batch row 0, message 0", "role"]),
        (["a", ["nested"]], ["is a list but other items are not"]),
        ([[solid(RED)] * 3], ["batch row 0", "3 images", "max_images=2", "max_images=N"]),
        ([["x", solid(RED, (100, 100))]], ["batch row 0, prompt item 1", "more than the limit of 5,000"]),
        ([["x", b"garbage"]], ["batch row 0, prompt item 1", "not a recognised image"]),
    ],
    ids=["empty", "object", "dict", "literal", "literal-chat", "role", "mixed", "too-many", "too-large", "corrupt"],
)
def test_bad_prompts_name_row_and_item(prompts, needles):
    proc = make_processor(max_images=2, max_pixels=5_000)
    with pytest.raises(InputError) as e:
        proc(prompts)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def _noisy_png(size=(64, 64)) -> bytes:
    gen = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_image_bytes_name_the_row_and_item():
    data = _noisy_png()
    proc = make_processor()
    for cut in (20, 300, len(data) // 2):  # inside the header, just after it, in the pixel data
        with pytest.raises(InputError) as e:
            proc([["fine", solid(RED)], ["a", data[:cut], "b"]])
        msg = str(e.value)
        assert msg.startswith("batch row 1, prompt item 1: the image bytes") and "truncated or corrupt" in msg, msg
    assert proc([["a", data, "b"]])["pixel_values"].shape == (1, 1, 3, S, S)


def test_lazily_opened_truncated_image_in_a_chat_names_the_message_and_part():
    data = _noisy_png()
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # Pillow has read the header only
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image", "image": lazy}]}]
    with pytest.raises(InputError, match=r"^batch row 0, message 0, part 1: the image could not be decoded"):
        make_processor()([messages])


def test_url_images_need_allow_urls():
    with pytest.raises(OfflineError, match=r"batch row 0, prompt item 1.*allow_urls=True"):
        make_processor()(["look", "https://example.com/cat.jpg"])


def test_chat_needs_a_chat_template():
    proc = make_processor()
    proc.tokenizer.chat_template = None
    with pytest.raises(InputError, match="batch row 0: chat messages need a chat template"):
        proc([{"role": "user", "content": "hi"}])


def test_missing_special_tokens_refused():
    tokens = TokensConfig()
    with pytest.raises(ConfigError, match="add_special_tokens"):
        InterleafProcessor(build_tiny_tokenizer(), tokens, ImageTransform(S, (0, 0, 0), (1, 1, 1)))


# -- length limits and truncation --


def test_too_long_prompt_is_refused_with_the_numbers():
    proc = make_processor(max_length=10)
    with pytest.raises(InputError) as e:
        proc(["a fairly long prompt with many many words in it", solid(RED)])
    msg = str(e.value)
    assert "batch row 0" in msg and "max_length=10" in msg and "truncation=True" in msg


def test_left_truncation_drops_whole_images_and_keeps_bos():
    proc = make_processor("idefics")
    prompt = [solid(RED), "one two three", solid(GREEN), solid(BLUE), "end"]
    full = proc(prompt)["input_ids"][0].tolist()
    f, img = proc.fake_image_token_id, proc.image_token_id
    for limit in range(4, len(full)):
        out = proc(prompt, max_length=limit, truncation=True)
        ids = out["input_ids"][0].tolist()
        assert len(ids) <= limit and ids[0] == proc.tokenizer.bos_token_id
        assert ids[1:] == full[len(full) - len(ids) + 1 :]  # a suffix of the body
        n = ids.count(img)
        for p, tok in enumerate(ids):  # every kept image keeps both fake tokens
            if tok == img:
                assert ids[p - 1] == f and ids[p + 1] == f
        assert ids[1] != f or ids[2] == img  # never starts with an orphan closing fake token
        if n:
            assert out["pixel_values"].shape[1] == n
            kept_colours = [colour_of(out["pixel_values"][0, i]) for i in range(n)]
            assert kept_colours == [RED, GREEN, BLUE][3 - n :]


def test_right_truncation_keeps_the_start():
    proc = make_processor("openflamingo")
    prompt = ["start", solid(RED), "middle words here", solid(GREEN), "the end"]
    full = proc(prompt)["input_ids"][0].tolist()
    img = proc.image_token_id
    second = full.index(img, full.index(img) + 1)
    out = proc(prompt, padding_side="right", max_length=second + 1, truncation=True)
    ids = out["input_ids"][0].tolist()
    assert ids == full[:second + 1]  # the second <image> is whole (one token) and fits
    assert out["pixel_values"].shape[1] == 2
    out = proc(prompt, padding_side="right", max_length=second, truncation=True)
    ids = out["input_ids"][0].tolist()
    assert ids == full[:second]
    assert out["pixel_values"].shape[1] == ids.count(proc.image_token_id) == 1
    with pytest.raises(InputError, match="cannot truncate"):
        proc([solid(RED), "x"], max_length=1, truncation=True)


# -- decode, save and load --


def test_decode_and_save_load_round_trip(tmp_path):
    proc = make_processor("idefics", add_eou=True, max_images=3, max_length=64)
    prompt = ["User:", solid(RED), "What is it?", "Assistant:"]
    before = proc(prompt)
    assert proc.decode(before["input_ids"][0]) == "User:What is it?Assistant:"
    assert proc.batch_decode(before["input_ids"]) == ["User:What is it?Assistant:"]
    proc.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "processor_config.json").read_text())
    assert config["processor_class"] == "InterleafProcessor" and config["tokens"]["prompt_format"] == "idefics"
    loaded = InterleafProcessor.from_pretrained(tmp_path / "p")
    after = loaded(prompt)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert (loaded.max_images, loaded.max_length, loaded.image_transform.to_dict()) == (
        3, 64, proc.image_transform.to_dict()
    )
    assert InterleafProcessor.from_pretrained(tmp_path / "p", max_images=5).max_images == 5


def test_from_pretrained_reports_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        InterleafProcessor.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        InterleafProcessor.from_pretrained(tmp_path / "half")
    assert "processor_config.json" in str(e.value) and "tokenizer_config.json" in str(e.value)
    assert "tokenizer.json," not in str(e.value)


def test_load_tokenizer_is_local_and_names_the_directory(tmp_path, no_network):
    from interleaf.processing import load_tokenizer

    tok = build_tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == tok.get_vocab() and loaded.chat_template == tok.chat_template
    with pytest.raises(CheckpointError, match="is not a local directory.*never downloads") as e:
        load_tokenizer("org/some-hub-tokenizer")
    assert "org/some-hub-tokenizer" in str(e.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load a tokenizer from") as e:
        load_tokenizer(tmp_path / "broken")
    assert str(tmp_path / "broken") in str(e.value) and "save_pretrained" in str(e.value)
    assert no_network == []
