"""IDEFICS <-> interleaf conversion: exact parity with transformers' IDEFICS, both ways.

Tiny random ``IdeficsForVisionText2Text`` models over the IDEFICS options (q/k norms, gate
initialisation and shape, cross-attention interval, with or without the perceiver, decoupled
extra vocabulary) are saved, converted, loaded with :func:`interleaf.load` and compared on a
batch with several images per row and a row without images: logits within 1e-5 (float32),
identical greedy generations, and identical logits after converting back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import tiny_idefics
from transformers import IdeficsConfig, IdeficsForVisionText2Text

import interleaf
from interleaf.convert import from_idefics, to_idefics
from interleaf.errors import CheckpointError, ConfigError

RED, GREEN, BLUE, GREY = (230, 20, 20), (20, 230, 20), (20, 20, 230), (128, 128, 128)


def img(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


def prompts(first=RED):
    return [
        ["User:", img(first), img(BLUE), "What is here?", img(GREEN), "Assistant:"],
        ["A text-only row, longer than the others so that padding shows up"],
        ["x", img(GREY, (25, 50)), "y"],
    ]


CASES = {
    "qk-normal-vector-interval2-resampler": dict(qk=True, alpha="normal", alpha_type="vector", interval=2),
    "ones-float-interval1-no-resampler": dict(qk=False, alpha="ones", resampler=False),
    "qk-zeros-float-interval1": dict(qk=True, alpha="zeros"),
    "normal-float-interval2-no-extra-vocab": dict(qk=False, alpha="normal", interval=2, extra=False),
    "qk-normal-vector-one-block-no-resampler": dict(qk=True, alpha="normal", alpha_type="vector", interval=4, resampler=False),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference, tok = tiny_idefics(**CASES[request.param])
    reference.save_pretrained(root / "idefics")
    tok.save_pretrained(root / "idefics")
    from_idefics(root / "idefics", root / "interleaf")
    model, processor = interleaf.load(root / "interleaf")
    return reference, model, processor, root, CASES[request.param]


def _compare_logits(a, b, mask, atol):
    diff = (a - b)[mask.bool()].abs().max().item()
    assert diff <= atol, f"logits differ by {diff}"


def test_logits_match_transformers(pair):
    reference, model, processor, _, _ = pair
    inputs = processor(prompts())
    assert inputs["pixel_values"].shape[:2] == (3, 3)
    with torch.no_grad():
        theirs = reference(**inputs).logits
        ours = model(**inputs).logits
    assert ours.shape == theirs.shape
    _compare_logits(ours, theirs, inputs["attention_mask"], 1e-5)


def test_images_change_only_later_tokens_when_gates_are_open(pair):
    reference, model, processor, _, case = pair
    if case.get("alpha") == "zeros":
        pytest.skip("zero gates: images have no effect by construction")
    a, b = processor(prompts(RED)), processor(prompts(GREY))
    with torch.no_grad():
        ours_a, ours_b = model(**a).logits, model(**b).logits
        theirs_b = reference(**b).logits
    first_image = int((a["input_ids"][0] == model.image_token_id).nonzero()[0])
    assert torch.equal(ours_a[0, :first_image], ours_b[0, :first_image])
    assert not torch.allclose(ours_a[0, first_image:], ours_b[0, first_image:])
    torch.testing.assert_close(ours_a[1:], ours_b[1:])  # other rows do not see row 0's image
    _compare_logits(ours_b, theirs_b, b["attention_mask"], 1e-5)


def test_greedy_generation_is_identical(pair):
    reference, model, processor, _, _ = pair
    inputs = processor(prompts())
    theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_round_trip_back_to_idefics(pair):
    reference, _, processor, root, _ = pair
    to_idefics(root / "interleaf", root / "back")
    saved = IdeficsConfig.from_pretrained(root / "back")
    assert (saved.alpha_initializer, saved.alpha_type) == (reference.config.alpha_initializer, reference.config.alpha_type)
    # alpha_initializer only draws the initial gates (every weight is loaded); "zeros" sidesteps
    # transformers failing to build "normal" + "float".
    back = IdeficsForVisionText2Text.from_pretrained(root / "back", alpha_initializer="zeros").eval()
    assert back.config.cross_layer_interval == reference.config.cross_layer_interval
    assert back.config.alpha_type == reference.config.alpha_type
    for key, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    inputs = processor(prompts())
    with torch.no_grad():
        _compare_logits(back(**inputs).logits, reference(**inputs).logits, inputs["attention_mask"], 0.0)


def test_converted_config_and_processor(pair):
    reference, model, processor, _, case = pair
    cfg = model.config
    interval = case.get("interval", 1)
    assert cfg.xattn_cfg.layer_indices(4) == list(range(0, 4, interval))
    assert cfg.vision_cfg.kind == "clip" and not cfg.vision_cfg.post_layernorm and not cfg.vision_cfg.drop_cls_token
    assert (model.resampler is not None) == case.get("resampler", True)
    assert cfg.tokens_cfg.prompt_format == "idefics" and cfg.tokens_cfg.add_end_of_utterance
    assert model.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    if case.get("extra", True):
        assert cfg.tokens_cfg.extra_start == reference.config.vocab_size and cfg.tokens_cfg.num_extra == 3
    assert model.num_parameters() == reference.num_parameters()


# -- errors --


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    reference, tok = tiny_idefics(interval=2, alpha_type="vector")
    reference.save_pretrained(root)
    tok.save_pretrained(root)
    return root, reference


def _rewrite_weights(src: Path, dst: Path, change) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    change(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_weight_is_named(saved, tmp_path):
    src, _ = saved
    key = "model.gated_cross_attn_layers.1.mlp.up_proj.weight"
    _rewrite_weights(src, tmp_path / "in", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
        from_idefics(tmp_path / "in", tmp_path / "out")


def test_unexpected_weight_is_named(saved, tmp_path):
    src, _ = saved
    _rewrite_weights(src, tmp_path / "in", lambda s: s.update({"model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"does not know \(1\): model\.extra_head\.weight"):
        from_idefics(tmp_path / "in", tmp_path / "out")


def test_missing_tokenizer_is_explained(saved, tmp_path):
    import shutil

    src, _ = saved
    (tmp_path / "in").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, tmp_path / "in" / name)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        from_idefics(tmp_path / "in", tmp_path / "out")
    from_idefics(tmp_path / "in", tmp_path / "out", tokenizer=src)  # or point at one
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_non_idefics_architecture_cannot_go_back(tmp_path):
    model, processor = interleaf.build("tiny-random", seed=0)
    interleaf.save(model, processor, tmp_path / "tiny")
    with pytest.raises(ConfigError, match="vision.kind"):
        to_idefics(tmp_path / "tiny", tmp_path / "out")


def test_interval_that_transformers_cannot_run_is_refused(tmp_path):
    reference, tok = tiny_idefics(interval=3)  # 4 layers: IDEFICS would index a 2nd block it lacks
    reference.save_pretrained(tmp_path / "in")
    tok.save_pretrained(tmp_path / "in")
    with pytest.raises(ConfigError, match="does not divide num_hidden_layers=4"):
        from_idefics(tmp_path / "in", tmp_path / "out")


def test_packed_input_with_eos_after_an_image(pair):
    reference, model, processor, _, case = pair
    inputs = processor([["x", img(RED), "a cat</s>", "more text after the document ends"]])
    assert inputs["image_attention_mask"][0, -1].sum() == 0  # IDEFICS: no image after the EOS
    with torch.no_grad():
        _compare_logits(model(**inputs).logits, reference(**inputs).logits, inputs["attention_mask"], 1e-5)


def test_command_line_round_trip(saved, tmp_path):
    from interleaf.cli import main

    src, reference = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "idefics", str(src), str(tmp_path / "ours")])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "to-idefics", str(tmp_path / "ours"), str(tmp_path / "back")])
    assert exit_info.value.code == 0
    back = IdeficsForVisionText2Text.from_pretrained(tmp_path / "back")
    for key, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line, exit code 2
        main(["convert", "idefics", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert exit_info.value.code == 2
