"""xGen-MM (BLIP-3) instruct through interleaf's processor: chat messages with images -> the model's inputs
-> generation, checked against the reference fixtures (``$INTERLEAF_FIXTURES/xgenmm-*``) and the instruct
prompt of the reference notes.

The processor writes one ``<image>`` per image (``"<image> "`` in a chat turn), and returns every image's
views as ``pixel_values`` (K, V_max, 3, S, S), zero-padded on the view axis, with ``image_sizes`` (K, 2) in
(width, height); the model grows each ``<image>`` into that image's tokens. The oracles: the fixture's
pixel tensors (produced by the public xGen-MM code from the PNGs), its greedy tokens, and the literal
instruct string.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import interleaf
from helpers.fixtures import config, tensors
from helpers.xgenmm import anyres_pixel_fixtures, instruct_fixture, phi3_like_tokenizer, released_like_folder
from interleaf.config import AnyresConfig
from interleaf.convert.xgenmm import from_xgenmm
from interleaf.errors import ConfigError, InputError
from interleaf.generation import generation_kwargs

README = Path(__file__).resolve().parents[1] / "README.md"

# The instruct prompt, literally as the reference notes give it (VLMEvalKit's xgen_mm.py, LAVIS conv_phi_3).
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
REFERENCE = "<|system|>\n" + SYSTEM + "<|end|>\n<|user|>\n{content}<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple:
    """The tiny instruct fixture converted with its tokenizer: (model, processor, directory)."""
    root = tmp_path_factory.mktemp("xgenmm")
    out = from_xgenmm(released_like_folder(root), root / "converted")
    model, processor = interleaf.load(out)
    return model, processor, out


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("image*.png"), key=lambda p: int(p.stem[len("image"):]))


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return [{"role": "user", "content": content}]


# -- pixels and generation against the fixtures ------------------------------------------------------------


def test_processor_views_are_the_fixtures_pixels_bit_for_bit(converted):
    model, processor, _ = converted
    for folder in anyres_pixel_fixtures():
        cfg, inputs, outputs = config(folder), tensors(folder / "inputs.safetensors"), tensors(
            folder / "outputs.safetensors")
        assert processor.anyres.grids == [tuple(g) for g in cfg["tiny_anyres_grids_px_w_h"]], folder.name
        images = pngs(folder)
        batch = processor(user(*images, "Describe it."))
        pixels, sizes = batch["pixel_values"], batch["image_sizes"]
        assert pixels.shape[0] == len(images) and sizes.shape == (len(images), 2)
        for j in range(len(images)):
            want = outputs[f"png.{j}.pixel_values"][0]  # (1+N, 3, S, S)
            assert torch.equal(pixels[j, : want.shape[0]], want), f"{folder.name} image{j}.png"
            assert not pixels[j, want.shape[0]:].any(), "views past an image's own are zeros"
            assert sizes[j].tolist() == inputs[f"png.{j}.image_size"].tolist()  # (width, height)
        assert (batch["input_ids"] == model.image_token_id).sum() == len(images)  # one <image> per image


def test_generation_from_processor_output_is_the_fixtures(converted):
    model, processor, _ = converted
    folder = instruct_fixture()
    cfg, inputs, outputs = config(folder), tensors(folder / "inputs.safetensors"), tensors(
        folder / "outputs.safetensors")
    anyres_folder = anyres_pixel_fixtures()[0]
    images = pngs(anyres_folder)
    rows = [[images[j] for j in row] for row in cfg["images_per_row_from_anyres_pngs"]]
    batch = processor([user(*row, "What is in this image?") for row in rows])
    k = 0
    for r, row in enumerate(rows):
        for i in range(len(row)):
            want = inputs[f"pixel_values.{r}.{i}"][0]
            assert torch.equal(batch["pixel_values"][k, : want.shape[0]], want), f"row {r} image {i}"
            assert batch["image_sizes"][k].tolist() == inputs[f"image_size.{r}.{i}"].tolist()
            k += 1
    # the fixture's prompt ids (random filler ids) with the processor's pixels: the reference's greedy tokens
    kwargs = cfg["generate_kwargs"]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                               image_sizes=batch["image_sizes"], do_sample=False, num_beams=1,
                               max_new_tokens=kwargs["max_new_tokens"])
    assert torch.equal(generated[:, ids.shape[1]:], outputs["generated_ids"])
    assert model.generation_config.eos_token_id == kwargs["eos_token_id"]  # <|end|>, from the converter
    assert model.generation_config.pad_token_id == kwargs["pad_token_id"]  # <pad>
    # and the processor's own rows run: left padded, the images grown in place
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 4
    assert bool((batch["attention_mask"][:, -1] == 1).all()), "left padding"


# -- the prompt --------------------------------------------------------------------------------------------


def test_chat_messages_render_to_the_reference_instruct_prompt(converted):
    _, processor, _ = converted
    image0, image1 = pngs(anyres_pixel_fixtures()[0])[:2]
    one = processor.render(user(image0, "What is in this image?"))
    assert one == REFERENCE.format(content="<image> What is in this image?")
    two = processor.render(user(image0, image1, "Describe it."))
    assert two == REFERENCE.format(content="<image> <image> Describe it.")
    assert not one.startswith(processor.tokenizer.bos_token or "<s>")  # no BOS
    ids = processor(user(image0, "What is in this image?"))["input_ids"][0].tolist()
    assert ids == processor.tokenizer(one, add_special_tokens=False)["input_ids"]


def test_a_system_message_and_earlier_turns_follow_the_phi3_conversation(converted):
    _, processor, _ = converted
    image0 = pngs(anyres_pixel_fixtures()[0])[0]
    messages = [{"role": "system", "content": "Be brief."}, *user(image0, "What is in this image?"),
                {"role": "assistant", "content": "A cat."}, *user("And this?")]
    assert processor.render(messages) == ("<|system|>\nBe brief.<|end|>\n<|user|>\n<image> What is in this image?"
                                          "<|end|>\n<|assistant|>\nA cat.<|end|>\n<|user|>\nAnd this?<|end|>\n"
                                          "<|assistant|>\n")


def test_generation_stops_at_end(converted, monkeypatch):
    model, processor, _ = converted
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert processor.tokenizer.eos_token == "<|end|>" and processor.tokenizer.padding_side == "left"
    kwargs = generation_kwargs(processor, max_new_tokens=6)
    assert end in kwargs["eos_token_id"] and kwargs["pad_token_id"] == processor.tokenizer.convert_tokens_to_ids(
        "<pad>")
    batch = processor(user(pngs(anyres_pixel_fixtures()[0])[0], "What is in this image?"))
    bias = model.language_model.lm_head.bias
    boosted = bias.detach().clone()
    boosted[end] += 1e4  # the model now says <|end|> at once
    monkeypatch.setattr(model.language_model.lm_head.bias, "data", boosted)
    for extra in (kwargs, dict(max_new_tokens=6)):  # the processor's settings, and the saved generation config
        out = model.generate(**batch, **extra)
        assert out[0, batch["input_ids"].shape[1]:].tolist() == [end], extra
    from interleaf.generation import generate_text

    assert "".join(generate_text(model, processor, "What is in this image?",
                                 images=[pngs(anyres_pixel_fixtures()[0])[0]], max_new_tokens=6)) == ""


# -- max_length and truncation ----------------------------------------------------------------------------


def test_max_length_counts_each_image_at_its_grown_length(converted):
    model, processor, _ = converted
    image0 = pngs(anyres_pixel_fixtures()[0])[0]  # 50 x 37: a 2x2 grid, 5 views
    assert processor.image_lengths([Image.open(image0)]) == [5 * model.projector.num_latents]
    prompt = user(image0, "What is in this image?")
    text = processor(prompt)["input_ids"].shape[1]
    grown = text - 1 + 5 * model.projector.num_latents
    assert processor(prompt, max_length=grown)["input_ids"].shape[1] == text
    with pytest.raises(InputError, match=rf"batch row 0: the prompt is {grown} tokens once its images are inserted "
                                         rf"\({text} text tokens, images of \[40\]\), longer than max_length={grown - 1}"):
        processor(prompt, max_length=grown - 1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_or_drops_whole_images_by_their_grown_length(converted, side):
    model, processor, _ = converted
    image0 = pngs(anyres_pixel_fixtures()[0])[0]
    prompt = user(image0, "What is in this image?")
    full = processor(prompt)
    latents = model.projector.num_latents
    for max_length in range(full["input_ids"].shape[1] + 5 * latents - 1, 5, -7):
        batch = processor(prompt, max_length=max_length, truncation=True, truncation_side=side)
        n_images = int((batch["input_ids"] == model.image_token_id).sum())
        grown = batch["input_ids"].shape[1] + n_images * (5 * latents - 1)
        assert grown <= max_length, (max_length, side)
        assert ("pixel_values" in batch) == (n_images == 1)
        with torch.no_grad():
            model(**batch)  # what the processor returns, the model takes


# -- bad input --------------------------------------------------------------------------------------------


def test_an_image_count_that_does_not_match_the_image_tokens_is_refused_by_name(converted):
    model, processor, _ = converted
    image0, image1 = pngs(anyres_pixel_fixtures()[0])[:2]
    batch = processor(user(image0, image1, "Describe it."))
    with pytest.raises(InputError, match=r"pixel_values holds 1 images but the text of the batch has 2 <image> "
                                         r"tokens"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"][:1], image_sizes=batch["image_sizes"][:1])
    with pytest.raises(InputError, match=r"batch row 0, message 0, part 1: the text contains '<image>' typed"):
        processor(user(image0, "Describe <image> it."))
    with pytest.raises(InputError, match="needs image_sizes"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])


def test_images_too_thin_or_too_large_for_the_grids_are_refused_by_name(converted):
    _, processor, _ = converted
    thin = Image.new("RGB", (600, 2))
    with pytest.raises(InputError, match=r"batch row 0, message 0, part 0: image of 600 x 2 px is too thin"):
        processor(user(thin, "What is in this image?"))
    small = processor.anyres
    try:
        processor.anyres = AnyresConfig(**{**small.__dict__, "max_image_pixels": 1000})
        processor.format.anyres = processor.anyres
        with pytest.raises(InputError, match=r"batch row 0, message 0, part 0: image of 50 x 37 px is larger than the "
                                             r"anyres limit of 1,000 pixels"):
            processor(user(pngs(anyres_pixel_fixtures()[0])[0], "What is in this image?"))
    finally:
        processor.anyres = processor.format.anyres = small


def test_crop_counts_above_the_limit_are_refused(converted):
    model, processor, _ = converted
    with pytest.raises(ConfigError, match=r"anyres\.grids\[0\].*6 crops, above max_crops 4"):
        AnyresConfig(convention="xgenmm", base_size=28, patch_size=14, grids=[(84, 56)])
    image0 = pngs(anyres_pixel_fixtures()[0])[0]
    batch = processor(user(image0, "What is in this image?"))
    too_many = torch.cat([batch["pixel_values"], torch.ones_like(batch["pixel_values"][:, :1])], dim=1)  # 6 views
    with pytest.raises(InputError, match=r"batch row 0, image 0: an image of 50 x 37 px takes a 2 x 2 grid, 5 views"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=too_many,
              image_sizes=batch["image_sizes"])


# -- settings reach the user ------------------------------------------------------------------------------


def test_the_converted_directory_holds_the_template_stop_and_pad(converted, tmp_path):
    model, processor, out = converted
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (87, 89)  # the fixture's <|end|>, <pad>
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["anyres"]["convention"] == "xgenmm" and saved["tokens"]["image_lm_length"] == model.projector.num_latents
    from interleaf.presets import seeds

    assert processor.tokenizer.chat_template == seeds.XGENMM_CHAT_TEMPLATE
    # and they survive another save / load
    again = interleaf.save(model, processor, tmp_path / "again")
    model2, processor2 = interleaf.load(again)
    assert processor2.tokenizer.chat_template == seeds.XGENMM_CHAT_TEMPLATE
    assert processor2.tokenizer.eos_token == "<|end|>" and processor2.tokens.image_lm_length == processor.tokens.image_lm_length
    assert model2.generation_config.eos_token_id == 87


def test_base_mode_conversion_gets_no_instruct_template(tmp_path):
    out = from_xgenmm(released_like_folder(tmp_path), tmp_path / "base", mode="base")
    model, processor = interleaf.load(out)
    assert processor.tokenizer.chat_template is None and processor.tokenizer.eos_token == "<|endoftext|>"
    assert processor.anyres is None


def test_the_presets_carry_their_chat_template_and_stop(tmp_path):
    from interleaf.presets import get_preset, seeds

    model, processor = interleaf.build("xgen-mm-phi3-mini", device="meta")
    assert processor is None
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (32007, 32011)
    preset = get_preset("xgen-mm-phi3-mini")
    assert (preset.chat_template, preset.stop_token) == (seeds.XGENMM_CHAT_TEMPLATE, "<|end|>")
    assert seeds.XGENMM_INSTRUCT_TEMPLATE == REFERENCE  # the format-string constant says the same
    assert preset.generation == dict(eos_token_id=seeds.XGENMM_STOP_TOKEN_ID, pad_token_id=seeds.XGENMM_PAD_TOKEN_ID)
    for name, template in (("llava-1.5-7b", seeds.LLAVA_15_CHAT_TEMPLATE),
                           ("llava-1.5-13b", seeds.LLAVA_15_CHAT_TEMPLATE),
                           *seeds.LLAVA_NEXT_CHAT_TEMPLATES.items()):
        preset = get_preset(name)
        assert (preset.chat_template, preset.stop_token) == (template, "</s>"), name
        assert preset.generation["eos_token_id"] == preset.text_config["eos_token_id"] == 2, name
    # with a tokenizer, the template and the stop token go onto it
    tok = phi3_like_tokenizer(instruct_fixture())
    model, processor = interleaf.build("xgen-mm-phi3-mini", device="meta", tokenizer=tok)
    assert processor.tokenizer.chat_template == seeds.XGENMM_CHAT_TEMPLATE
    assert processor.tokenizer.eos_token == "<|end|>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert processor.anyres.convention == "xgenmm" and processor.tokens.image_lm_length == 128


# -- the README snippet -----------------------------------------------------------------------------------


def test_the_readme_snippet_runs_on_the_tiny_converted_model(tmp_path, monkeypatch):
    """The README's xGen-MM instruct snippet, as written, on the tiny fixture model converted with
    `interleaf convert xgen-mm` (the command the README shows)."""
    download = released_like_folder(tmp_path)  # stands for a released xGen-MM instruct folder
    image_path = pngs(anyres_pixel_fixtures()[0])[0]
    monkeypatch.chdir(tmp_path)
    from interleaf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        # $ interleaf convert xgen-mm xgen-mm-phi3-mini-instruct-interleave-r-v1.5 xgen-mm-instruct
        main(["convert", "xgen-mm", str(download), "xgen-mm-instruct"])
    assert exit_info.value.code == 0

    text = README.read_text(encoding="utf-8")
    section = text[text.index("xGen-MM instruct, from the released folder"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"photo.jpg"', repr(str(image_path))).replace("max_new_tokens=256", "max_new_tokens=16")
    namespace: dict = {}
    exec(compile(code, "README xGen-MM instruct", "exec"), namespace)
    inputs, out, answer = namespace["inputs"], namespace["out"], namespace["answer"]
    assert isinstance(answer, str)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 16
