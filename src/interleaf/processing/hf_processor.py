"""The processor as transformers' ``ProcessorMixin`` callers use it (TRL's trainers, AutoProcessor).

:class:`HubProcessorMixin` is the base of :class:`~interleaf.processing.InterleafProcessor`. It is a
``transformers.ProcessorMixin`` (TRL tells a vision-language processor from a tokenizer by that
``isinstance`` check and then reads ``processor.tokenizer``), but ``ProcessorMixin.__init__`` is not
called: that constructor wants sub-processors of registered classes (an image processor, a tokenizer)
saved as separate files, while interleaf's processor is a tokenizer, the model's prompt format and one
image transform, saved as ``processor_config.json``. Every method TRL and ``Trainer`` call is defined
here or in the processor: ``__call__``, ``apply_chat_template``, ``tokenizer``, ``chat_template``,
``model_input_names``, ``save_pretrained`` / ``from_pretrained``, ``decode`` / ``batch_decode``.

Text in the model's spelling (transformers' convention): ``processor(text=..., images=...)`` takes
strings in which each image stands where its image token is, written as the prompt format writes it
(``<image>``; ``<|endofchunk|><image>`` in an OpenFlamingo chat; IDEFICS' fake tokens around it), and
one list of images per row (or one flat list, handed to the rows in order). The text is tokenized as
given; LLaVA's format, which writes an image as one ``<image>`` per vision token, takes one ``<image>``
per image here and expands it, as transformers' LLaVA processors do. Truncation keeps or drops whole
images, as for prompts. :meth:`HubProcessorMixin.apply_chat_template` renders conversations that way
(``tokenize=False``), so ``processor(text=processor.apply_chat_template(c), images=imgs)`` gives the
ids ``processor(c)`` gives; with ``tokenize=True`` it is ``processor(conversations, ...)``.

Labels: a trainer that builds labels from ``input_ids`` (TRL's ``DataCollatorForVisionLanguageModeling``
for ``messages`` rows) trains on the image placeholders too. :class:`ImagePlaceholderMasking` wraps a
collator and sets the labels of every token that stands for an image to ``IGNORE_INDEX``.
Prompt-completion rows (TRL's default ``completion_only_loss``) and DPO's preference rows keep the
images in the prompt, which carries no loss anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import ProcessorMixin

from ..errors import InputError
from .prompt_format import IGNORE_INDEX
from .prompts import ImageRef, ParsedPrompt, Text, parse_prompt, split_batch


class HubProcessorMixin(ProcessorMixin):
    """transformers' processor interface over interleaf's processor (see the module docstring)."""

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (the one interleaf renders conversations with)."""
        return getattr(self.tokenizer, "chat_template", None)

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self.tokenizer.chat_template = value

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", self.images_key]

    # -- text in the model's spelling --
    def _images_per_row(self, texts: list[str], images: Any) -> list[list]:
        """``images`` (None, one image, one list per row, or one flat list) -> one list per row."""
        token = self.tokens.image_token
        wanted = [t.count(token) for t in texts]
        if images is None:
            rows = [[] for _ in texts]
        elif not isinstance(images, (list, tuple)):
            rows = [[images]] if len(texts) == 1 else None
        elif all(isinstance(i, (list, tuple)) for i in images):
            rows = [list(i) for i in images]
        elif any(isinstance(i, (list, tuple)) for i in images):
            raise InputError("images: mixes lists and single images; pass one list of images per text row "
                             "(or one flat list for all rows)")
        else:
            flat, rows = list(images), []
            if len(flat) != sum(wanted):
                raise InputError(f"images: {len(flat)} images for {sum(wanted)} {token!r} placeholders in the "
                                 "texts; pass one image per placeholder, or one list of images per row")
            for n in wanted:
                rows.append(flat[:n])
                flat = flat[n:]
        if rows is None or len(rows) != len(texts):
            raise InputError(f"images: {len(texts)} text rows but images for {1 if rows is None else len(rows)}; "
                             "pass one list of images per text row")
        for r, (n, row) in enumerate(zip(wanted, rows)):
            if n != len(row):
                raise InputError(f"text row {r}: {n} {token!r} placeholders but {len(row)} images; write the image "
                                 f"token once where each image goes (processor.apply_chat_template does)")
            if len(row) > self.max_images:
                raise InputError(f"text row {r}: {len(row)} images, more than max_images={self.max_images}; pass "
                                 "fewer images, or raise processor.max_images")
        return rows

    def _encode_texts(self, text: Any, images: Any, add_special_tokens: bool, fit, allow_urls: bool):
        """Texts in the model's spelling -> (ids, images, counts) per row, as ``_encode`` gives them;
        ``fit``: (max_length, truncation, truncation side)."""
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text: expected a string or a non-empty list of strings (the model's spelling, one "
                             "image token per image); pass prompts and conversations as the first argument instead")
        token = self.tokens.image_token
        rows = []
        for r, (t, imgs) in enumerate(zip(texts, self._images_per_row(list(texts), images))):
            segments: list = []
            for i, piece in enumerate(t.split(token)):
                if i:
                    segments.append(ImageRef(imgs[i - 1], f"text row {r}, image {i - 1}"))
                segments.append(Text(piece, f"text row {r}"))
            rows.append(ParsedPrompt(segments, is_chat=True))  # spans: an <|endofchunk|> before <image> is its own
        fmt = self.format
        loaded = [self._load_row(row, allow_urls) for row in rows] if fmt.tiled_images else [row.images for row in rows]
        expand = fmt.is_llava and not fmt.xgenmm_images  # LLaVA: one <image> in the text, one per vision token in ids
        strings = []
        for row, images in zip(rows, loaded):
            pending = iter(images)
            strings.append("".join(s.text if isinstance(s, Text) else
                                   fmt.image_text(False, False, next(pending)) if expand else token
                                   for s in row.segments))
        encoded = self.tokenizer(strings, add_special_tokens=add_special_tokens)["input_ids"]
        all_ids, all_images, all_counts = [], [], []
        for r, (ids, row, images) in enumerate(zip(encoded, rows, loaded)):
            counts = [fmt.image_token_count(img) for img in images] if fmt.sized_images else None
            lengths = self.image_lengths(images) if fmt.xgenmm_images else None
            ids, images, counts = self._fit(ids, row, (images, lengths), counts, r, *fit)
            all_ids.append(ids)
            all_images.append(images)
            all_counts.append(counts)
        return all_ids, all_images, all_counts

    # -- chat --
    def apply_chat_template(
        self, conversation, chat_template: str | None = None, *, tokenize: bool = False, return_dict: bool = False,
        return_tensors: str | None = None, add_generation_prompt: bool | None = None,
        continue_final_message: bool = False, return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict | None = None, **kwargs,
    ):
        """Render one conversation or a batch with the tokenizer's chat template.

        Messages hold text and image parts (``{"type": "image", "image": ...}``, the forms ``processor``
        takes). ``tokenize=False``: the text, each image written as ``processor(text=...)`` reads it (one
        image token per image; see the module docstring). ``tokenize=True``: ``processor(conversation,
        **processor_kwargs)`` (padding, padding_side, truncation, max_length, pad_to_multiple_of; older
        callers pass them as keywords), the ids alone unless ``return_dict``. The BOS token is the prompt
        format's choice, as for ``processor(conversation)``, so ``add_special_tokens`` is ignored.
        """
        if chat_template is not None and chat_template != self.chat_template:
            raise InputError("apply_chat_template: another chat_template for one call is not supported; set "
                             "processor.chat_template (the tokenizer's) instead")
        if return_assistant_tokens_mask:
            raise InputError("apply_chat_template: return_assistant_tokens_mask is not supported; train on "
                             "completions with prompt-completion rows, or wrap the collator in "
                             "ImagePlaceholderMasking to train on whole conversations without the images")
        if continue_final_message:
            raise InputError("apply_chat_template: continue_final_message is not supported; end the conversation "
                             "with a complete message")
        if kwargs.pop("tools", None) is not None:
            raise InputError("apply_chat_template: tools are not supported by interleaf's chat templates; drop them")
        options = {**kwargs, **(processor_kwargs or {})}
        options.pop("add_special_tokens", None)
        if tokenize:
            out = self(conversation, add_generation_prompt=add_generation_prompt,
                       return_tensors=return_tensors or "pt", **options)
            return out if return_dict else out["input_ids"]
        rows, batched = split_batch(conversation)
        texts = [self._chat_text(row, r, add_generation_prompt) for r, row in enumerate(rows)]
        return texts if batched else texts[0]

    def _chat_text(self, conversation, r: int, add_generation_prompt: bool | None) -> str:
        row = parse_prompt(conversation, r, self.tokenizer, add_generation_prompt=add_generation_prompt,
                           default_system=self.default_system, image_token=self.tokens.image_token)
        if not row.is_chat:
            raise InputError(f"conversation {r}: expected chat messages ({{'role', 'content'}} dicts)")
        self._validate(row, r)
        fmt = self.format
        compact = fmt.is_llava and not fmt.xgenmm_images  # one <image> per image, expanded by the call
        segments = [s.text if isinstance(s, Text) else self.tokens.image_token if compact else _Placeholder()
                    for s in row.segments]
        return fmt.render(segments, True, True, False, self.tokens.add_end_of_utterance)

    # -- labels --
    def image_placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) bool: the tokens that stand for an image (its image tokens, and the
        ``<|endofchunk|>`` or fake tokens the prompt format writes with it)."""
        fmt = self.format
        mask = input_ids == self.image_token_id
        extra = getattr(self.tokens, "image_placeholder_token_id", None)
        if extra is not None:
            mask |= input_ids == extra
        if not fmt.is_llava:
            for b, row in enumerate(input_ids.tolist()):
                for start, end in fmt.image_spans(row, True):
                    mask[b, start:end] = True
        return mask


class _Placeholder:
    """An image for :meth:`PromptFormat.render` whose spelling does not depend on the image."""


class ImagePlaceholderMasking:
    """A data collator whose labels skip the image placeholders.

    ``collator``: any callable turning examples into a batch with ``input_ids`` and ``labels`` (by
    default TRL's ``DataCollatorForVisionLanguageModeling(processor, **collator_kwargs)``, e.g.
    ``max_length=...``); every token :meth:`HubProcessorMixin.image_placeholder_mask` marks gets the
    label ``IGNORE_INDEX``. Pass it as ``SFTTrainer(..., data_collator=ImagePlaceholderMasking(processor))``.
    """

    def __init__(self, processor, collator=None, **collator_kwargs):
        if collator is None:
            from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

            collator = DataCollatorForVisionLanguageModeling(processor=processor, **collator_kwargs)
        elif collator_kwargs:
            raise InputError(f"ImagePlaceholderMasking: {sorted(collator_kwargs)} configure the default collator; "
                             "pass them to your own collator instead")
        self.processor = processor
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if "labels" not in batch:
            raise InputError("ImagePlaceholderMasking: the wrapped collator's batch has no 'labels'; wrap a "
                             "collator that builds them")
        labels = batch["labels"].clone()
        labels[self.processor.image_placeholder_mask(batch["input_ids"]).to(labels.device)] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


__all__ = ["HubProcessorMixin", "ImagePlaceholderMasking"]
