"""InfiMM test pieces: a Zephyr-style tokenizer with InfiMM's two tokens, and a tiny checkpoint in
InfiMM's own layout (config.json with "visual" and "language", model.safetensors, tokenizer files)
made from a fixture's weights with the LM's rows resized to that tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.fixtures import config, tensors
from interleaf.processing import build_tiny_tokenizer

# Zephyr-7B-beta's chat template as InfiMM's tokenizer_config.json holds it (rendered with
# transformers' jinja settings: blocks trimmed, so the newlines after ``}}`` stay).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def zephyr_like_tokenizer():
    """The tiny tokenizer with Zephyr's chat template and InfiMM's two added tokens."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tok.chat_template = ZEPHYR_TEMPLATE
    return tok


def fixture_heads(folder: Path) -> dict[str, int]:
    """The heads a fixture's perceiver and blocks were built with (the released models: 8 and 8)."""
    over = config(folder).get("_fixture", {})
    return dict(perceiver_heads=over.get("perceiver_constructor_overrides", {}).get("heads", 8),
                xattn_heads=over.get("xattn_constructor_overrides", {}).get("heads", 8))


def infimm_checkpoint(fixture: Path, folder: Path, seed: int = 0) -> Path:
    """``folder`` as a released InfiMM folder would be: the fixture's tower, perceiver, blocks and
    decoder layers, the LM's embedding and head resized (random rows) to :func:`zephyr_like_tokenizer`,
    whose ids for ``<|endofchunk|>`` and ``<image>`` the config names."""
    tok = zephyr_like_tokenizer()
    data = config(fixture)
    data.pop("_fixture", None)
    size = len(tok)
    data["language"] = {**data["language"], "vocab_size": size, "bos_token_id": tok.bos_token_id,
                        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    data["eoc_token_id"], data["image_token_id"] = tok.convert_tokens_to_ids(["<|endofchunk|>", "<image>"])
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in tensors(fixture / "model.safetensors").items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            value = torch.randn((size, value.shape[1]), generator=gen) / value.shape[1] ** 0.5
        state[key] = value.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    save_file(state, str(folder / "model.safetensors"))
    tok.save_pretrained(folder)
    return folder
