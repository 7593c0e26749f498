"""build / load / save, the Auto classes, presets, and generation through the processor."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import tiny_clip, tiny_lm
from transformers import AutoModelForCausalLM, AutoProcessor

import interleaf
from interleaf.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tiny():
    return interleaf.build("tiny-random", seed=0)


@pytest.fixture
def red():
    return Image.new("RGB", (40, 30), (220, 20, 20))


def test_presets_lists_tiny_random_and_it_builds_offline_from_its_seed(no_network):
    assert "tiny-random" in interleaf.presets()
    model, processor = interleaf.build("tiny-random", seed=0)
    assert no_network == []  # nothing fetched: the weights are drawn here, from the seed
    again, _ = interleaf.build("tiny-random", seed=0)
    other, _ = interleaf.build("tiny-random", seed=1)
    weights, same, different = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert not torch.equal(weights["vision_tower.backbone.blocks.0.qkv.weight"],
                           different["vision_tower.backbone.blocks.0.qkv.weight"])
    assert model.num_trainable_parameters() < model.num_parameters()
    assert processor.image_token_id == model.config.tokens_cfg.image_token_id


def test_unknown_preset_and_option_are_named():
    with pytest.raises(ConfigError, match="unknown preset 'tiny'.*tiny-random"):
        interleaf.build("tiny")
    with pytest.raises(ConfigError, match="'colour'.*unknown option"):
        interleaf.build("tiny-random", colour="red")


def test_save_load_round_trip_and_auto_classes(tiny, red, tmp_path):
    model, processor = tiny
    inputs = processor([["A photo:", red, "It shows"], ["text only"]])
    interleaf.save(model, processor, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names
    loaded, loaded_proc = interleaf.load(tmp_path / "m")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    auto_proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(auto) is interleaf.InterleafForConditionalGeneration
    assert type(auto_proc) is interleaf.InterleafProcessor
    with torch.no_grad():
        ref = model(**inputs).logits
        assert torch.equal(loaded(**loaded_proc([["A photo:", red, "It shows"], ["text only"]])).logits, ref)
        assert torch.equal(auto.eval()(**inputs).logits, ref)


def test_load_with_device_map_and_on_meta(tiny, red, tmp_path):
    model, processor = tiny
    interleaf.save(model, processor, tmp_path / "m")
    inputs = processor([[red, "a photo of"]])
    with torch.no_grad():
        ref = model(**inputs).logits
        auto, _ = interleaf.load(tmp_path / "m", device_map="auto")
        assert torch.equal(auto(**inputs).logits, ref)
        # a decoder layer (with its cross-attention block) offloaded to disk: accelerate's hooks
        # move it in and out, and the wrapped LM still computes the same logits
        device_map = {"vision_tower": "cpu", "resampler": "cpu", "language_model.model.embed_tokens": "cpu",
                      "language_model.model.layers.0": "cpu", "language_model.model.layers.1": "disk",
                      "language_model.model.norm": "cpu", "language_model.model.rotary_emb": "cpu",
                      "language_model.lm_head": "cpu"}
        offloaded, _ = interleaf.load(tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "off"))
        assert offloaded.hf_device_map["language_model.model.layers.1"] == "disk"
        assert torch.equal(offloaded(**inputs).logits, ref)
        gen = dict(max_new_tokens=4, do_sample=False)
        assert offloaded.generate(**inputs, **gen).tolist() == model.generate(**inputs, **gen).tolist()
    meta_model, _ = interleaf.build("tiny-random", device="meta")
    assert all(p.device.type == "meta" for p in meta_model.parameters())
    assert meta_model.num_parameters() == model.num_parameters()


def test_load_errors_say_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="is not a local directory.*never downloads"):
        interleaf.load("org/some-hub-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="lacks config.json"):
        interleaf.load(tmp_path / "empty")


def test_build_from_local_directories(tmp_path, red):
    """The equivalent of OpenFlamingo's create_model_and_transforms, from local pieces."""
    tiny_clip(seed=0).save_pretrained(tmp_path / "clip")
    tok = interleaf.processing.build_tiny_tokenizer()
    lm = tiny_lm("llama", seed=None, vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                 pad_token_id=2)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    model, processor = interleaf.build(
        vision=tmp_path / "clip", lm=tmp_path / "lm", cross_attention={"every_n_layers": 2},
        resampler={"depth": 1, "num_latents": 4, "heads": 2, "head_dim": 8},
    )
    assert model.config.vision_cfg.kind == "clip"
    assert len(model.cross_attention_blocks) == 1
    # the LM's weights were loaded, not re-initialised
    assert torch.equal(model.get_input_embeddings().weight, lm.get_input_embeddings().weight)
    text = processor([["hello there"]])
    with torch.no_grad():
        assert (model(**text).logits[..., : len(tok)] - lm(**text).logits).abs().max() <= 1e-6
    inputs = processor([[red, "a photo of"]])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # the reference: greedy decoding by hand, one full forward pass (no cache) per new token
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if int(ids[0, -1]) == processor.tokenizer.eos_token_id:
                break
    assert out.tolist() == ids.tolist()


def test_streaming_and_stop_strings(tiny, red):
    from interleaf.generation import generate_text

    model, processor = tiny
    whole = "".join(generate_text(model, processor, "what is it?", images=[red], max_new_tokens=12))
    streamed = list(generate_text(model, processor, "what is it?", images=[red], max_new_tokens=12, stream=True))
    assert len(streamed) > 1 and "".join(streamed) == whole
    assert len(whole) > 3
    stop = whole[2:4]
    stopped = "".join(generate_text(model, processor, "what is it?", images=[red], max_new_tokens=12, stop=[stop]))
    assert stopped == whole[: whole.index(stop)]  # cut before the stop string, which is not returned
    streamed_stop = list(generate_text(model, processor, "what is it?", images=[red], max_new_tokens=12, stop=[stop],
                                       stream=True))
    assert "".join(streamed_stop) == stopped


def test_empty_prompt_is_refused(tiny):
    from interleaf.errors import InputError
    from interleaf.generation import build_prompt

    with pytest.raises(InputError, match="prompt is empty"):
        build_prompt(tiny[1], "   ")


def test_cli_presets_and_generate(tmp_path, red):
    from typer.testing import CliRunner

    from interleaf.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "tiny-random" in result.output
    red.save(tmp_path / "red.png")
    model, processor = interleaf.build("tiny-random", seed=3)
    interleaf.save(model, processor, tmp_path / "m")
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "red.png"),
                                 "--max-new-tokens", "5", "what colour is it?"])
    assert result.exit_code == 0, result.output
    from interleaf.generation import generate_text

    expected = "".join(generate_text(model, processor, "what colour is it?", images=[tmp_path / "red.png"], max_new_tokens=5))
    assert result.stdout.strip() == expected.strip()
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "nope.png"), "hi"])
    assert result.exit_code != 0
    assert "nope.png" in str(result.exception) or "nope.png" in result.output
