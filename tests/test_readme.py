"""The README's Python quickstart runs as written (with a local photo)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart in Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "photo.jpg")
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert (tmp_path / "my-model" / "config.json").exists()
    # the loss is the shifted cross-entropy over the labelled tokens, computed here by hand with the
    # reloaded model (the same weights)
    batch, labels = namespace["batch"], namespace["labels"]
    with torch.no_grad():
        logits = namespace["model"](**batch).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert float(namespace["loss"].detach()) == pytest.approx(float(by_hand), rel=1e-5)


def test_llava_next_snippet_runs_on_a_converted_model(tmp_path, monkeypatch):
    """The README's LLaVA-NeXT snippet, as written, on a tiny transformers LLaVA-NeXT converted with
    `interleaf convert llava-next`; its answer is transformers' greedy answer."""
    from tiny import tiny_llava_next, tiny_llava_next_processor
    from typer.testing import CliRunner

    from interleaf.cli import app

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The token-insertion family"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    reference, tok = tiny_llava_next()
    hf_processor = tiny_llava_next_processor(reference, tok)
    reference.save_pretrained(tmp_path / "hf")
    hf_processor.save_pretrained(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["convert", "llava-next", str(tmp_path / "hf"), "runs/llava-next"])
    assert result.exit_code == 0, result.output
    Image.new("RGB", (50, 37), (200, 40, 10)).save(tmp_path / "llava_v1_5_radar.jpg")
    namespace: dict = {"print": lambda *a, **k: None}
    exec(compile(code.replace("max_new_tokens=100", "max_new_tokens=6"), "README LLaVA-NeXT", "exec"), namespace)
    inputs, output = namespace["inputs"], namespace["output"]
    with torch.no_grad():
        expected = reference.generate(**hf_processor(images=Image.open(tmp_path / "llava_v1_5_radar.jpg"),
                                                     text="[INST] <image>\nWhat is shown in this image? [/INST]",
                                                     return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert output[0, inputs["input_ids"].shape[1]:].tolist() == expected[0, -6:].tolist()


def test_lora_snippet_targets_only_what_it_names():
    """The README's PEFT snippet, as written: adapters on exactly the LM's attention and MLP layers,
    the resampler and the cross-attention blocks trained in full, nothing of the vision tower."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**LoRA (PEFT).**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"print": lambda *a, **k: None}
    exec(compile(code, "README LoRA", "exec"), namespace)
    model, targets = namespace["peft_model"], namespace["targets"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert adapted and all(t.startswith("language_model.") for t in targets)
    assert {a.removeprefix("base_model.model.") for a in adapted} == set(targets)
    assert not any("vision_tower" in n for n in trainable)
    assert any("resampler" in n and ".lora_" not in n for n in trainable)
    assert any("cross_attention" in n and ".lora_" not in n for n in trainable)
