"""xGen-MM instruct test helpers: a tokenizer shaped like the fixture's tiny Phi-3 vocabulary, and the
tiny instruct fixture converted with it (so that it has a processor)."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers.fixtures import config, fixture_dirs, tensor_names

# The instruct template's words, so that rendered prompts tokenize into words rather than the unknown token.
_WORDS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. What is in this image? Describe it. and")


def instruct_fixture() -> Path:
    """The first xgenmm-* folder holding a whole instruct (anyres, per-image pixel_values) model."""
    found = [d for d in fixture_dirs("xgenmm-", has=("model.safetensors", "config.json", "inputs.safetensors",
                                                      "outputs.safetensors"))
             if any(k.startswith("vlm.lang_model.") for k in tensor_names(d / "model.safetensors"))
             and any(n.startswith("pixel_values.") for n in tensor_names(d / "inputs.safetensors"))]
    assert found, "no xgenmm-* fixture with a whole instruct model"
    return found[0]


def anyres_pixel_fixtures() -> list[Path]:
    """Every xgenmm-* folder with PNGs and their reference pixel_values (``png.{j}.pixel_values``)."""
    found = [d for d in fixture_dirs("xgenmm-", has=("outputs.safetensors", "config.json", "image0.png"))
             if any(n.startswith("png.") and n.endswith(".pixel_values") for n in
                    tensor_names(d / "outputs.safetensors"))]
    assert found, "no xgenmm-* fixture with PNGs and png.{j}.pixel_values"
    return found


def phi3_like_tokenizer(folder: Path):
    """A word-level tokenizer of exactly ``initial_tokenizer_len`` tokens with the tiny Phi-3 special tokens
    at the ids the fixture's README gives (``tiny_phi3_special_ids``: <|endoftext|>, <|assistant|>,
    <|system|>, <|end|>, <|user|>, <pad>): a stand-in for Phi-3's tokenizer at the fixture's scale."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = config(folder)
    size, ids = cfg["initial_tokenizer_len"], cfg["tiny_phi3_special_ids"]
    specials = {"<|endoftext|>": ids["endoftext"], "<|assistant|>": ids["assistant"], "<|system|>": ids["system"],
                "<|end|>": ids["end"], "<|user|>": ids["user"], "<pad>": ids["pad"]}
    free = [i for i in range(size) if i not in specials.values()]
    words = ["<unk>"] + list(dict.fromkeys(_WORDS.split()))
    vocab = {**{w: free[i] for i, w in enumerate(words)}, **{f"w{i}": i for i in free[len(words):]}, **specials}
    assert len(vocab) == size and len(free) > len(words)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|endoftext|>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in ("<pad>", "<|endoftext|>")]},
                           replace_extra_special_tokens=False)
    assert len(tok) == size
    return tok


def released_like_folder(tmp_path: Path) -> Path:
    """A copy of the tiny instruct fixture laid out like a released download: config.json, the weights and
    the tokenizer files side by side."""
    folder = instruct_fixture()
    out = tmp_path / "xgen-mm-tiny-download"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, out / name)
    phi3_like_tokenizer(folder).save_pretrained(str(out))
    return out
