"""Chat templates that loop over a message's content parts (the llava-hf checkpoints' own).

A converted llava-hf model keeps its checkpoint's chat template, which iterates over
``message['content']`` as ``{"type": "text"}`` / ``{"type": "image"}`` parts and writes ``<image>``
for each image part. interleaf's processor hands such a template list content, and its output for a
conversation equals what transformers' ``LlavaProcessor`` / ``LlavaNextProcessor`` (built offline
from the same tiny tokenizer and template) return for ``apply_chat_template(..., tokenize=False)``
then processing. String-content templates are unaffected (tests/test_processor.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from helpers.llava import save_reference
from tiny import tiny_llava, tiny_llava_next, tiny_llava_next_processor

import interleaf
from interleaf.config import TokensConfig
from interleaf.convert.llava import from_llava
from interleaf.convert.llava_next import from_llava_next
from interleaf.errors import InputError
from interleaf.processing import ImageTransform, InterleafProcessor, build_tiny_tokenizer
from interleaf.processing.prompts import template_wants_parts

# The chat templates of the llava-hf processors (chat_template.json), as listed (by checkpoint) in
# openvinotoolkit/openvino.genai, src/cpp/src/tokenizer.cpp (chat_template_fallback_map, commit 0115b44d):
# llava-hf/llava-1.5-7b-hf (shared with llava-v1.6-vicuna) and llava-hf/llava-v1.6-mistral-7b-hf.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# A template that takes either kind of content (as most current transformers templates do).
EITHER_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}"
)

WIDE, TALL, SQUARE = (Image.new("RGB", (100, 30), (200, 30, 30)), Image.new("RGB", (35, 120), (30, 30, 200)),
                      Image.new("RGB", (40, 40), (30, 200, 30)))


def conversations(system: bool) -> dict[str, list[dict]]:
    """One conversation with one image, one with two (text before and after an image, an assistant turn)."""
    head = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}] if system else []
    one = [{"role": "user", "content": [{"type": "image", "image": WIDE}, {"type": "text", "text": "What is it?"}]}]
    two = [
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image", "image": TALL}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A blue bar."}]},
        {"role": "user", "content": [{"type": "image", "image": SQUARE}, {"type": "text", "text": "And this?"}]},
    ]
    return {"one image": head + one, "two images": head + two}


def images_of(conversation) -> list[Image.Image]:
    return [p["image"] for m in conversation for p in m["content"] if p["type"] == "image"]


def llava_processor(reference, tok):
    """transformers' ``LlavaProcessor`` (its PIL image processor) for a :func:`tiny_llava` model."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    cfg = reference.config
    s = cfg.vision_config.image_size
    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
        tokenizer=tok, patch_size=cfg.vision_config.patch_size, num_additional_image_tokens=1,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy)


@pytest.fixture(scope="module", params=["llava-1.5", "llava-v1.6-mistral"])
def converted(request, tmp_path_factory):
    """A tiny llava-hf-style checkpoint whose template only its processor holds (chat_template.json), converted
    and loaded with interleaf, and transformers' processor for it -> (name, ours, theirs)."""
    root = tmp_path_factory.mktemp(request.param)
    next_ = request.param == "llava-v1.6-mistral"
    template = LLAVA_NEXT_MISTRAL_TEMPLATE if next_ else LLAVA_15_TEMPLATE
    reference, tok = (tiny_llava_next if next_ else tiny_llava)(seed=4)
    tok.chat_template = None
    save_reference(reference, tok, root / "src", "save_pretrained")
    (root / "src" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, ours = interleaf.load((from_llava_next if next_ else from_llava)(root / "src", root / "out"))
    assert ours.tokenizer.chat_template == template
    theirs = (tiny_llava_next_processor if next_ else llava_processor)(reference, ours.tokenizer)
    theirs.chat_template = template
    return request.param, ours, theirs


@pytest.mark.parametrize("which", ["one image", "two images"])
def test_the_processor_writes_what_transformers_writes(converted, which):
    name, ours, theirs = converted
    conversation = conversations(system=name == "llava-v1.6-mistral")[which]
    text = theirs.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.count("<image>") == len(images_of(conversation))
    want = theirs(images=images_of(conversation), text=text, return_tensors="pt")
    got = ours(conversation)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert int((got["input_ids"] == ours.image_token_id).sum()) > len(images_of(conversation))  # expanded
    if "image_sizes" in want:  # LLaVA-NeXT: the same views of the same images
        assert got["image_sizes"].tolist() == want["image_sizes"].tolist()
        assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_a_left_padded_batch_matches_transformers(converted):
    name, ours, theirs = converted
    batch = list(conversations(system=name == "llava-v1.6-mistral").values())
    texts = [theirs.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in batch]
    ours.tokenizer.padding_side = "left"
    want = theirs(images=[i for c in batch for i in images_of(c)], text=texts, padding=True, return_tensors="pt")
    got = ours(batch)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()


def test_which_templates_want_parts():
    tok = build_tiny_tokenizer()
    assert not template_wants_parts(tok)  # interleaf's own template takes a string
    for template, wants in [(LLAVA_15_TEMPLATE, True), (LLAVA_NEXT_MISTRAL_TEMPLATE, True),
                            (EITHER_TEMPLATE, False), ("no messages at all", False)]:
        tok.chat_template = template
        assert template_wants_parts(tok) is wants, template


# -- each family spells the image a list-content template writes, once per image part --

def family_processor(fmt: str) -> InterleafProcessor:
    tokens = TokensConfig(prompt_format=fmt, image_seq_length=3 if fmt == "llava" else 1)
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tokens.required_tokens()})
    tok.chat_template = LLAVA_15_TEMPLATE
    return InterleafProcessor(tok, tokens, ImageTransform(8, (0.5,) * 3, (0.5,) * 3, resize="squash"))


SPELLING = {"openflamingo": "<|endofchunk|><image>", "idefics": "<fake_token_around_image><image><fake_token_around_image>",
            "llava": "<image><image><image>"}


@pytest.mark.parametrize("fmt", list(SPELLING))
def test_each_image_part_is_spelled_by_the_family(fmt):
    proc = family_processor(fmt)
    conversation = conversations(system=False)["two images"]
    bare = [{"role": m["role"], "content": [{"type": p["type"], "text": p.get("text", "")} for p in m["content"]]}
            for m in conversation]
    template_text = proc.tokenizer.apply_chat_template(bare, add_generation_prompt=True, tokenize=False)
    assert template_text.count("<image>") == 2
    assert proc.render(conversation) == proc.tokenizer.bos_token + template_text.replace("<image>", SPELLING[fmt])
    assert proc(conversation)["pixel_values"].shape[:2] == (1, 2)


def test_a_string_conversation_goes_through_a_list_template():
    proc = family_processor("openflamingo")
    text = proc.render([{"role": "user", "content": ["What is it?", WIDE]}])
    assert text == "<s>USER: <|endofchunk|><image>\nWhat is it? ASSISTANT:"


# -- bad input --

def test_a_template_that_writes_no_image_token_is_refused():
    proc = family_processor("openflamingo")
    proc.tokenizer.chat_template = ("{% for m in messages %}{% for p in m['content'] | selectattr('type', 'equalto', "
                                    "'text') %}{{ p['text'] }}{% endfor %}{% endfor %}")
    with pytest.raises(InputError, match=r"batch row 0: the chat template wrote '<image>' 0 times for the "
                                         r"conversation's 1 images.*writes '<image>' once for each image part"):
        proc([{"role": "user", "content": [{"type": "image", "image": WIDE}, {"type": "text", "text": "hi"}]}])


def test_an_image_token_typed_in_the_text_is_refused():
    proc = family_processor("llava")
    with pytest.raises(InputError, match=r"batch row 0, message 0, part 1: the text contains '<image>' typed literally"):
        proc([{"role": "user", "content": [{"type": "image", "image": WIDE}, {"type": "text", "text": "a <image>"}]}])
