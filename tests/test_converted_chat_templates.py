"""LLaVA and LLaVA-NeXT conversions keep the source checkpoint's chat template: the tokenizer's own, or, when
the tokenizer has none, the one the transformers processor saved beside it (``chat_template.json``, as the
llava-hf checkpoints hold it)."""

from __future__ import annotations

import json

import pytest

import interleaf
from helpers.llava import save_reference
from interleaf.convert.llava import from_llava
from interleaf.convert.llava_next import from_llava_next
from tiny import tiny_llava, tiny_llava_next

PROCESSOR_TEMPLATE = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@pytest.mark.parametrize("where", ["tokenizer", "processor"])
def test_the_converted_directory_keeps_the_source_chat_template(family, where, tmp_path):
    reference, tok = (tiny_llava if family == "llava" else tiny_llava_next)(seed=2)
    own = tok.chat_template
    assert own, "the tiny tokenizer has a chat template of its own"
    if where == "processor":
        tok.chat_template = None
    save_reference(reference, tok, tmp_path / "src", "save_pretrained")
    if where == "processor":
        (tmp_path / "src" / "chat_template.json").write_text(json.dumps({"chat_template": PROCESSOR_TEMPLATE}))
    convert = from_llava if family == "llava" else from_llava_next
    _, processor = interleaf.load(convert(tmp_path / "src", tmp_path / "out"))
    assert processor.tokenizer.chat_template == (own if where == "tokenizer" else PROCESSOR_TEMPLATE)
