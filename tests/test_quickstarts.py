"""The seeds' quick-start snippets, run on tiny converted models.

The snippets are copied from the model cards (seeds 001: IDEFICS base and instruct; seed 000:
InfiMM) and changed only where running offline forces it, each change marked ``# changed:``:

- import lines (interleaf's model class under IDEFICS' name);
- the checkpoint name -> the local directory of a tiny converted model;
- image URLs -> local files. The model cards' URLs cannot be fetched offline, and a plain path
  string is text to both IDEFICS' processor and ours, so the images are ``pathlib.Path`` objects.

The IDEFICS snippets' generations are also checked against transformers' IDEFICS (the model the
tiny interleaf one was converted from) on the same inputs, in float32: identical ids.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from PIL import Image
from helpers.fixtures import fixture_dirs
from helpers.infimm import fixture_heads, infimm_checkpoint
from tiny import tiny_idefics
from transformers import AutoTokenizer
from transformers import IdeficsForVisionText2Text as TransformersIdefics

from interleaf.convert import from_idefics, from_infimm


@pytest.fixture(scope="module")
def idefics_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart-idefics")
    from interleaf.processing.tokenizer import DEFAULT_TEXT

    # The model card's words in the tiny tokenizer's training text keep its prompts as short as
    # LLaMA's tokenizer makes them (the snippet's max_length=100 counts the prompt).
    card = "Asterix and Obelix, we can see What is in this image? This picture depicts Idefix, the dog of " \
        "Obelix in Asterix and Obelix. Idefix is running on the ground. And who is that? User: Assistant:\n"
    reference, tok = tiny_idefics(
        qk=True, alpha="normal", alpha_type="vector", interval=2, tokenizer_text=DEFAULT_TEXT + card * 20
    )
    reference.save_pretrained(root / "idefics")
    tok.save_pretrained(root / "idefics")
    from_idefics(root / "idefics", root / "interleaf")
    Image.new("RGB", (64, 48), (200, 160, 40)).save(root / "idefix.jpg")
    Image.new("RGB", (48, 64), (40, 90, 200)).save(root / "r22b.gif")
    return root


def assert_same_as_transformers(root, inputs, **generate_kwargs):
    """The snippet runs in bfloat16, where rounding differs between implementations: compare the
    same generation in float32 with transformers' IDEFICS, which the tiny model was converted from."""
    import interleaf

    ours, _ = interleaf.load(root / "interleaf")
    reference = TransformersIdefics.from_pretrained(root / "idefics").eval()
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    assert torch.equal(ours.generate(**inputs, **generate_kwargs), reference.generate(**inputs, **generate_kwargs))


def test_idefics_base_quickstart(idefics_dirs, capsys):
    # ---- model card snippet (base model) ----
    import torch
    from interleaf import InterleafForConditionalGeneration as IdeficsForVisionText2Text  # changed: import
    from transformers import AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = str(idefics_dirs / "interleaf")  # changed: a local tiny converted model
    model = IdeficsForVisionText2Text.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).to(device)
    processor = AutoProcessor.from_pretrained(checkpoint)

    # We feed to the model an arbitrary sequence of text strings and images. Images can be either URLs or PIL Images.
    prompts = [
        [
            pathlib.Path(idefics_dirs / "idefix.jpg"),  # changed: a local image instead of the URL
            "In this picture from Asterix and Obelix, we can see"
        ],
    ]

    # --batched mode
    inputs = processor(prompts, return_tensors="pt").to(device)
    # --single sample mode
    # inputs = processor(prompts[0], return_tensors="pt").to(device)

    generated_ids = model.generate(**inputs, max_length=100)
    generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True)
    for i, t in enumerate(generated_text):
        print(f"{i}:\n{t}\n")
    # ---- end of snippet ----

    printed = capsys.readouterr().out
    assert printed.startswith("0:\nIn this picture from Asterix and Obelix, we can see")
    assert generated_ids.shape[1] <= 100 and generated_ids.shape[1] > inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == 1
    assert_same_as_transformers(idefics_dirs, inputs, max_length=100)


def test_idefics_instruct_quickstart(idefics_dirs, capsys):
    # ---- model card snippet (instruct model) ----
    import torch
    from interleaf import InterleafForConditionalGeneration as IdeficsForVisionText2Text  # changed: import
    from transformers import AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = str(idefics_dirs / "interleaf")  # changed: a local tiny converted model
    model = IdeficsForVisionText2Text.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).to(device)
    processor = AutoProcessor.from_pretrained(checkpoint)

    # We feed to the model an arbitrary sequence of text strings and images. Images can be either URLs or PIL Images.
    prompts = [
        [
            "User: What is in this image?",
            pathlib.Path(idefics_dirs / "idefix.jpg"),  # changed: a local image instead of the URL
            "<end_of_utterance>",
            "\nAssistant: This picture depicts Idefix, the dog of Obelix in Asterix and Obelix. Idefix is running on the ground.<end_of_utterance>",
            "\nUser:",
            pathlib.Path(idefics_dirs / "r22b.gif"),  # changed: a local image instead of the URL
            "And who is that?<end_of_utterance>",
            "\nAssistant:",
        ],
    ]

    # --batched mode
    inputs = processor(prompts, add_end_of_utterance_token=False, return_tensors="pt").to(device)
    # --single sample mode
    # inputs = processor(prompts[0], return_tensors="pt").to(device)

    # Generation args
    exit_condition = processor.tokenizer("<end_of_utterance>", add_special_tokens=False).input_ids
    bad_words_ids = processor.tokenizer(["<image>", "<fake_token_around_image>"], add_special_tokens=False).input_ids

    generated_ids = model.generate(**inputs, eos_token_id=exit_condition, bad_words_ids=bad_words_ids, max_length=100)
    generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True)
    for i, t in enumerate(generated_text):
        print(f"{i}:\n{t}\n")
    # ---- end of snippet ----

    assert capsys.readouterr().out.startswith("0:\nUser: What is in this image?")
    new = generated_ids[0, inputs["input_ids"].shape[1]:].tolist()
    assert new and not set(new) & {ids[0] for ids in bad_words_ids}
    eou = exit_condition[0]
    assert eou not in new[:-1]  # generation stops at the first <end_of_utterance>
    assert len(generated_ids[0]) == 100 or new[-1] == eou
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == 2
    assert_same_as_transformers(
        idefics_dirs, inputs, eos_token_id=exit_condition, bad_words_ids=bad_words_ids, max_length=100
    )


@pytest.fixture(scope="module")
def infimm_dir(tmp_path_factory):
    """A tiny InfiMM checkpoint in InfiMM's own layout (EVA02-style tower, perceiver, gated blocks, Mistral;
    the weights of the first infimm-* fixture, the LM's rows resized to a Zephyr-style tokenizer),
    converted with `interleaf convert infimm`."""
    fixture = fixture_dirs("infimm-", has=("model.safetensors", "config.json"))[0]
    root = tmp_path_factory.mktemp("quickstart-infimm")
    released = infimm_checkpoint(fixture, root / "released")
    from_infimm(released, root / "model", **fixture_heads(fixture))
    (root / "run" / "assets").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 180, 90)).save(root / "run" / "assets" / "infimm-logo.webp")
    return root


def _run_infimm_snippet(model_dir: str) -> tuple[list[str], dict, object]:
    # ---- model card snippet (InfiMM) ----
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)  # changed: a local tiny model
    prompts = [
        {
            "role": "user",
            "content": [
                {"image": "assets/infimm-logo.webp"},
                "Please explain this image to me.",
            ],
        }
    ]
    inputs = processor(prompts)

    # use bf16
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,  # changed: a local tiny model
        local_files_only=True,
        torch_dtype=torch.bfloat16,
        trust_remote_code=True,
    ).eval()
    inputs = inputs.to(model.device)
    inputs["batch_images"] = inputs["batch_images"].to(torch.bfloat16)
    generated_ids = model.generate(
        **inputs,
        min_generation_length=0,
        max_generation_length=256,
    )
    generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True)
    print(generated_text)
    # ---- end of snippet ----
    assert inputs["batch_images"].dtype == torch.bfloat16
    assert generated_ids.shape[1] <= inputs["input_ids"].shape[1] + 256
    return generated_text, inputs, model


def test_infimm_quickstart(infimm_dir, monkeypatch, capsys):
    monkeypatch.chdir(infimm_dir / "run")  # the snippet's relative image path
    text, inputs, model = _run_infimm_snippet(str(infimm_dir / "model"))
    # interleaf's generate returns the prompt and the new tokens (InfiMM's returned the new ones only)
    assert len(text) == 1 and "Please explain this image to me." in text[0]
    assert capsys.readouterr().out.startswith("['")
    # the real tower, InfiMM's prompt (an empty system turn, <|endofchunk|><image> per image) and pixels
    assert model.config.vision_cfg.kind == "eva_clip" and model.config.xattn_cfg.skip_rows_without_image
    tok = AutoTokenizer.from_pretrained(infimm_dir / "model")
    card = "<|system|>\n</s>\n<|user|>\n<|endofchunk|><image>Please explain this image to me.</s>\n<|assistant|>\n"
    assert inputs["input_ids"][0].tolist() == tok([card])["input_ids"][0]
    assert inputs["batch_images"].shape == (1, 1, 1, 3, 42, 42)  # the fixture tower's image size
