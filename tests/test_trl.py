"""TRL's SFTTrainer and DPOTrainer on interleaf's model and processor, as TRL's own VLM examples run.

The processor is a ``transformers.ProcessorMixin`` (``text=``, ``images=``, ``apply_chat_template``);
the model gives TRL's chunked loss what it reads (``base_model(...).last_hidden_state``, an output
layer whose ``weight`` covers the added tokens). The trainers themselves run for a few steps on tiny
models, offline (``report_to="none"``, nothing from the hub). Both fusion families.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import ProcessorMixin

import interleaf
from interleaf.errors import InputError
from interleaf.model.embeddings import DecoupledHead
from interleaf.processing import IGNORE_INDEX, ImagePlaceholderMasking

FAMILIES = ["tiny-random", "tiny-llava"]  # cross-attention, token insertion
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}

README = Path(__file__).resolve().parents[1] / "README.md"


def _square(rgb, size=(32, 32)):
    return Image.new("RGB", size, rgb)


def _conversation(colour: str, image=None):
    """A user turn with an image and a question, and the answer (TRL's typed-parts message format)."""
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [
        {"role": "user", "content": [image_part, {"type": "text", "text": "What colour is the square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"The square is {colour}."}]},
    ]


def _sft_rows():
    """llava-instruct-mix-vsft's shape: ``messages`` and ``images``."""
    return [{"messages": _conversation(c), "images": [_square(rgb)]} for c, rgb in COLOURS.items()]


def _preference_rows():
    """RLAIF-V's shape as TRL's VLM DPO example has it: ``images``, ``prompt``, ``chosen``, ``rejected``."""
    names = list(COLOURS)
    return [
        {"images": [_square(rgb)],
         "prompt": [_conversation(c)[0]],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {c}."}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"It is {names[(i + 1) % 4]}."}]}]}
        for i, (c, rgb) in enumerate(COLOURS.items())
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    return interleaf.build(request.param, seed=0)


# -- the processor --


def test_the_processor_is_a_processor_mixin_with_the_tokenizer(built):
    _, processor = built
    assert isinstance(processor, ProcessorMixin)
    assert processor.tokenizer is not None and processor.chat_template == processor.tokenizer.chat_template
    assert processor.model_input_names[:2] == ["input_ids", "attention_mask"]


def test_chat_template_text_with_images_gives_the_conversations_ids(built):
    """``processor(text=apply_chat_template(c), images=...)`` (TRL's prompt-completion and DPO path) and
    ``apply_chat_template(c, tokenize=True)`` (its messages path) give what ``processor(c)`` gives."""
    _, processor = built
    imgs = [_square((200, 10, 10)), _square((10, 10, 200), (40, 32))]
    conversations = [_conversation("red", imgs[0]), _conversation("blue", imgs[1])]
    reference = processor(conversations, padding_side="right")
    texts = processor.apply_chat_template(conversations)
    assert all(t.count(processor.tokens.image_token) == 1 for t in texts)  # one placeholder per image
    from_text = processor(text=texts, images=[[imgs[0]], [imgs[1]]], padding=True, padding_side="right",
                          add_special_tokens=False)
    tokenized = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right", "truncation": False, "max_length": None,
                          "add_special_tokens": False, "pad_to_multiple_of": None})
    for out in (from_text, tokenized):
        assert torch.equal(out["input_ids"], reference["input_ids"])
        assert torch.equal(out["attention_mask"], reference["attention_mask"])
        assert torch.equal(out["pixel_values"], reference["pixel_values"])
    ids_only = processor.apply_chat_template(conversations[0], tokenize=True)
    assert torch.equal(ids_only, processor(conversations[0])["input_ids"])


def test_text_with_a_flat_image_list_and_the_seeds_positional_call(built):
    """The seeds' collator calls ``processor(texts, images, return_tensors="pt", padding=True)`` with one
    image per row; the images go to the rows in order, one per placeholder."""
    _, processor = built
    imgs = [_square(rgb) for rgb in COLOURS.values()][:2]
    texts = processor.apply_chat_template([_conversation("red", imgs[0]), _conversation("green", imgs[1])])
    flat = processor(texts, imgs, return_tensors="pt", padding=True, add_special_tokens=False)
    nested = processor(text=texts, images=[[imgs[0]], [imgs[1]]], add_special_tokens=False)
    assert torch.equal(flat["input_ids"], nested["input_ids"]) and torch.equal(flat["pixel_values"],
                                                                              nested["pixel_values"])
    padded = processor(text=texts, images=imgs, padding=True, pad_to_multiple_of=16, add_special_tokens=False)
    assert padded["input_ids"].shape[1] % 16 == 0


def test_llava_text_takes_one_image_token_per_image_and_expands_it():
    _, processor = interleaf.build("tiny-llava", seed=0)
    out = processor(text="<image>A square.", images=[_square((1, 2, 3))])
    n = processor.tokens.image_seq_length
    assert n > 1 and int((out["input_ids"] == processor.image_token_id).sum()) == n


def test_text_truncation_drops_whole_images(built):
    _, processor = built
    imgs = [_square((200, 10, 10)), _square((10, 200, 10))]
    text = "Look: <image> and <image> then a long tail of words after both images"
    full = processor(text=text, images=[imgs], add_special_tokens=False)
    ids = full["input_ids"][0].tolist()
    second_image = [p for p, t in enumerate(ids) if t == processor.image_token_id][-1]
    cut = processor(text=text, images=[imgs], truncation=True, max_length=second_image, padding_side="right",
                    add_special_tokens=False)
    kept = cut["input_ids"][0].tolist()
    assert len(kept) <= second_image and kept == ids[:len(kept)]
    per_image = sum(1 for t in ids if t == processor.image_token_id) // 2
    assert sum(1 for t in kept if t == processor.image_token_id) == per_image  # the first image whole, not the second
    assert cut["pixel_values"].shape[1] == 1 and torch.equal(cut["pixel_values"][0, 0], full["pixel_values"][0, 0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(text="<image> and <image>", images=[_square((0, 0, 0))]), "placeholders"),
    (dict(text=["<image>", "none"], images=[[_square((0, 0, 0))]]), "text rows but images for 1"),
    (dict(text=["<image>"], images=[[_square((0, 0, 0))], _square((0, 0, 0))]), "mixes lists"),
    (dict(text=[3]), "text: expected a string"),
    (dict(text="a", pad_to_multiple_of=0), "pad_to_multiple_of must be a positive integer"),
    (dict(), "nothing to process"),
])
def test_bad_text_calls_name_the_input_and_the_fix(built, kwargs, message):
    _, processor = built
    with pytest.raises(InputError, match=message):
        processor(**kwargs)


def test_prompts_and_text_together_and_unsupported_template_options_are_refused(built):
    _, processor = built
    conversation = _conversation("red", _square((1, 1, 1)))
    with pytest.raises(InputError, match="not both"):
        processor([["a prompt"]], text="a text")
    with pytest.raises(InputError, match="return_assistant_tokens_mask"):
        processor.apply_chat_template(conversation, tokenize=True, return_assistant_tokens_mask=True)
    with pytest.raises(InputError, match="tools"):
        processor.apply_chat_template(conversation, tools=[{"type": "function"}])
    with pytest.raises(InputError, match="chat_template"):
        processor.apply_chat_template(conversation, chat_template="{{ messages }}")


def test_the_image_placeholder_mask_covers_each_images_tokens(built):
    _, processor = built
    out = processor(_conversation("red", _square((9, 9, 9))))
    ids = out["input_ids"][0].tolist()
    mask = processor.image_placeholder_mask(out["input_ids"])[0].tolist()
    spans = processor.format.image_spans(ids, True)
    assert [p for p, m in enumerate(mask) if m] == [p for s, e in spans for p in range(s, e)]
    assert all(ids[p] != processor.tokenizer.eos_token_id for p, m in enumerate(mask) if m)


def test_any_resolution_text_gives_the_conversations_ids():
    """LLaVA-NeXT: each image's token count follows its size; the text holds one ``<image>`` per image."""
    _, processor = interleaf.build("tiny-llava-next", seed=0)
    imgs = [_square((200, 0, 0), (64, 32)), _square((0, 0, 200), (32, 90))]
    conversations = [[_conversation("red", img)[0]] for img in imgs]
    reference = processor(conversations, padding_side="right")
    out = processor(text=processor.apply_chat_template(conversations), images=[[imgs[0]], [imgs[1]]],
                    padding_side="right", add_special_tokens=False)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(out[key], reference[key]), key


# -- the model --


def test_base_model_hidden_states_through_the_output_weight_give_the_logits(built):
    model, processor = built
    batch = processor([_conversation("red", _square((200, 10, 10))), [_square((10, 10, 200)), "a blue"]])
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.base_model(**batch).last_hidden_state
    head = model.get_output_embeddings()
    assert head.weight.shape[0] == logits.shape[-1] == len(processor.tokenizer)
    bias = head.bias if head.bias is not None else 0
    torch.testing.assert_close(hidden @ head.weight.T + bias, logits, atol=1e-5, rtol=0)
    assert model.config.get_text_config() is model.config.text_config


def test_the_full_vocabulary_head_trains_the_added_rows_and_adds_no_keys(built):
    model, _ = built
    head = model.get_output_embeddings()
    decoupled = model.language_model.get_output_embeddings()
    assert isinstance(decoupled, DecoupledHead) and head.extra is decoupled.extra
    assert torch.equal(head.weight[decoupled.extra_start:decoupled.extra_start + decoupled.num_extra],
                       decoupled.extra)
    assert not any("full_vocabulary_head" in k for k in model.state_dict())
    assert any(m is head for m in model.modules())  # PEFT finds the output layer among the named modules
    trained = copy.deepcopy(model)
    trained.get_output_embeddings().weight.sum().backward()
    assert trained.language_model.get_output_embeddings().extra.grad is not None


def test_replace_placement_hidden_states_are_at_the_callers_positions():
    model, processor = interleaf.build("tiny-llava", seed=0, insertion={"placement": "replace"},
                                       tokens={"image_seq_length": 1})
    batch = processor([[_square((200, 10, 10)), "a red square"], ["no image here"]])
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.base_model(**batch).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape
    head = model.get_output_embeddings()
    torch.testing.assert_close(hidden @ head.weight.T + (head.bias if head.bias is not None else 0), logits,
                               atol=1e-5, rtol=0)


def test_gradient_checkpointing_and_input_require_grads(built):
    model, processor = built
    model = copy.deepcopy(model).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = processor([_conversation("red", _square((200, 10, 10)))])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- the trainers --


def _fused_loss(model, batch) -> torch.Tensor:
    """The causal-LM loss of ``batch["labels"]`` straight from the model's logits."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX)


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_sft_trainer_trains_without_loss_on_images_and_saves_a_loadable_model(preset, tmp_path):
    import datasets
    import trl
    model, processor = interleaf.build(preset, seed=0)
    collator = ImagePlaceholderMasking(processor)
    dataset = datasets.Dataset.from_list(_sft_rows())
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                         save_strategy="no", max_length=None, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                             data_collator=collator)

    # the labels: TRL's own collator's, less every image placeholder
    examples = [dict(row) for row in dataset]
    plain = trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling(processor=processor)(copy.deepcopy(examples))
    batch = collator(examples)
    images = processor.image_placeholder_mask(batch["input_ids"])
    assert images.any() and bool((batch["labels"][images] == IGNORE_INDEX).all())
    assert torch.equal(batch["labels"][~images], plain["labels"][~images])
    # TRL's chunked loss on this batch is the loss of those labels computed from the model's logits
    trl_loss = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()})
    torch.testing.assert_close(trl_loss.detach(), _fused_loss(model, batch), atol=1e-4, rtol=1e-4)

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1
    trainer.save_model(str(tmp_path / "out"))
    loaded, loaded_processor = interleaf.load(tmp_path / "out")
    probe = loaded_processor([_conversation("red", _square(COLOURS["red"]))])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, model(**probe).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_dpo_trainer_raises_the_reward_margin(preset, tmp_path):
    import datasets
    import trl
    built_model, built_processor = interleaf.build(preset, seed=0)
    interleaf.save(built_model, built_processor, tmp_path / "base")
    model, processor = interleaf.load(tmp_path / "base")  # TRL loads the reference model from this directory
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                         save_strategy="no", max_length=None, seed=0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_preference_rows()),
                             processing_class=processor)
    trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(margins) == 8 and margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 0.02
    assert margins[-1] > max(margins[:2])


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_sft_prompt_completion_rows_with_lora_need_no_collator(preset, tmp_path):
    """Prompt-completion rows (TRL's default completion-only loss) keep the images in the prompt, which has
    no loss; LoRA through ``peft_config`` on the LM's attention trains with TRL's defaults (max_length,
    gradient checkpointing)."""
    import datasets
    import trl
    import peft
    model, processor = interleaf.build(preset, seed=0)
    rows = [{"prompt": [_conversation(c)[0]], "completion": [_conversation(c)[1]], "images": [_square(rgb)]}
            for c, rgb in COLOURS.items()]
    dataset = datasets.Dataset.from_list(rows)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, report_to="none", bf16=False, use_cpu=True, save_strategy="no", seed=0)
    lora = peft.LoraConfig(r=4, target_modules=r"language_model\..*\.self_attn\.(q|v)_proj")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                             peft_config=lora)
    batch = trainer.data_collator([dict(row) for row in dataset])
    assert bool((batch["labels"][processor.image_placeholder_mask(batch["input_ids"])] == IGNORE_INDEX).all())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.1
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)


# The README's TRL section runs as written (offline, a tiny preset).


@pytest.mark.slow
def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text[text.index("## TRL (SFT and DPO)"):], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (TRL)", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "InterleafForConditionalGeneration"
    assert (tmp_path / "sft-out" / "final" / "processor_config.json").is_file()
