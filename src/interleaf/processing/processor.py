"""The processor: interleaved prompts and chat conversations -> model inputs.

:class:`InterleafProcessor` turns a prompt (a list mixing text and images) or a chat conversation
into ``input_ids``, ``attention_mask``, ``pixel_values`` and ``image_attention_mask``, following
the model's prompt format (``tokens.prompt_format``), written by
:class:`~interleaf.processing.prompt_format.PromptFormat` (``processor.format``), which the
training tokeniser uses too:

- ``"openflamingo"``: each image becomes ``<image>``; text is inserted as is. In chat
  conversations (InfiMM style) each image becomes ``<|endofchunk|><image>``.
- ``"llava"`` (token insertion): each image becomes ``tokens.image_seq_length`` ``<image>`` tokens,
  one per vision token the model writes there (``PromptFormat.image_token_count``).
- ``"idefics"``: BOS first; each image becomes ``<fake_token_around_image><image>
  <fake_token_around_image>`` with consecutive images sharing the fake token between them,
  exactly as transformers' ``IdeficsProcessor`` builds it (text items stripped of spaces,
  ``<end_of_utterance>`` between consecutive texts when asked, the image mask reset after an EOS).

LLaVA-NeXT (``anyres`` with convention ``llava_next``, in the ``llava`` format): each image is
tiled (:mod:`interleaf.processing.anyres`) and written as exactly as many ``<image>`` tokens as
its size gives; ``pixel_values`` is then ``(K, max_views, 3, S, S)``, the batch's K images in
reading order, each its base view then its crops, zero-padded on the view axis, and
``image_sizes`` ``(K, 2)`` their original (height, width): the layout of transformers'
``LlavaNextProcessor``. An image too small or too large for the grids is refused by name.

xGen-MM (``anyres`` with convention ``xgenmm``, placement ``replace``): each image is one
``<image>`` token (``"<image> "`` in a chat conversation, as the instruct checkpoints are prompted),
which the model replaces by the image's whole sequence: ``(1 + N crops) * tokens.image_lm_length``
positions (:meth:`InterleafProcessor.image_lengths`). ``pixel_values`` is ``(K, max_views, 3, S,
S)`` as for LLaVA-NeXT (every image's views, base view first, then its crops row-major, zero-padded
on the view axis) and ``image_sizes`` ``(K, 2)`` their original (width, height), PIL's
``Image.size`` and the order xGen-MM's model reads (:mod:`interleaf.model.xgenmm`). ``max_length``
counts the row as the model will see it, each image at its grown length, and truncation keeps or
drops whole images by that length.

Truncation drops whole images with their tokens (see ``PromptFormat.cut_left`` / ``cut_right``).

When no row of a batch has an image, ``pixel_values`` is absent and ``image_attention_mask`` has
shape ``(B, T, 0)``.

InfiMM's conventions (its released processor, less its faults), for a processor built with
``images_key="batch_images"`` and ``default_system=""``: chat messages with ``{"image": ...}``
parts, each image written ``<|endofchunk|><image>`` in its place (the ``openflamingo`` format's
chat spelling), a system message with empty content put first when the conversation has none,
then the tokenizer's chat template; every turn is rendered once (InfiMM's own processor appends
each non-user turn twice, the second time as a user turn: not reproduced). Images are resized on
their shortest edge (bicubic) and centre-cropped (``ImageTransform``), normalised with the vision
config's mean and std (OpenAI CLIP's by default), and handed over as ``batch_images`` ``(B,
N_img, 1, 3, S, S)``. A batch without any image still gets ``batch_images``: zeros ``(B, 1, 1, 3,
S, S)`` (InfiMM encodes a black image there); no ``<image>`` token points at it, so the model
never encodes it and the output is the text-only one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature

from ..config import AnyresConfig, TokensConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..files import read_json
from .hf_processor import HubProcessorMixin
from .images import ImageTransform, load_image
from .layout import image_attention_mask, pad_rows
from .prompt_format import PromptFormat
from .prompts import ImageRef, ParsedPrompt, Text, parse_prompt, split_batch
from .tiled_images import LoadedImage, tiled_pixels
from .tokenizer import load_tokenizer

PROCESSOR_CONFIG = "processor_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


_HUB_LOADING_KWARGS = (
    "_from_auto", "revision", "trust_remote_code", "local_files_only", "cache_dir", "token",
    "subfolder", "force_download", "proxies", "_from_pipeline", "use_fast",
)


class InterleafProcessor(HubProcessorMixin):
    """Prompts with images -> a :class:`transformers.BatchFeature` for the model.

    A ``transformers.ProcessorMixin`` for TRL: ``text=``, ``images=``, ``apply_chat_template`` (:mod:`.hf_processor`).

    The special tokens of ``tokens`` must already be in ``tokenizer`` (the model builder adds
    them). ``max_images`` limits images per row, ``max_pixels`` the size of one image, and
    ``max_length`` (the LM's context) the tokens per row. ``anyres``: the model's any-resolution
    tiling (``config.insertion_cfg.anyres``); its views use ``image_transform``'s mean and std.
    Under placement ``replace`` (xGen-MM) ``max_length`` counts each image at the length the model
    grows it to (``tokens.image_lm_length`` per view, :meth:`PromptFormat.lm_token_count`).
    ``images_key="batch_images"``: images come back under InfiMM's name and shape. ``default_system``:
    the content of a system message put first in a chat conversation that has none (InfiMM: ``""``;
    ``None``, the default, adds nothing).
    """

    def __init__(
        self,
        tokenizer,
        tokens: TokensConfig,
        image_transform: ImageTransform,
        max_images: int = 8,
        max_pixels: int = 50_000_000,
        max_length: int | None = None,
        images_key: str = "pixel_values",
        anyres: AnyresConfig | dict | None = None,
        default_system: str | None = None,
    ):
        if default_system is not None and not isinstance(default_system, str):
            raise ConfigError("default_system", f"must be a string or None, got {type(default_system).__name__}")
        self.default_system = default_system  # chat: a system message put first when there is none (InfiMM: "")
        if images_key not in ("pixel_values", "batch_images"):
            raise ConfigError("images_key", f"must be 'pixel_values' or 'batch_images', got {images_key!r}")
        self.images_key = images_key  # "batch_images": InfiMM's name and (B, N_img, 1, 3, H, W) shape
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.image_transform = image_transform
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.max_length = max_length
        self.anyres = AnyresConfig(**anyres) if isinstance(anyres, dict) else anyres
        self.format = PromptFormat(tokenizer, tokens, self.anyres)  # the spelling training uses too
        if tokenizer.pad_token_id is None:
            raise ConfigError(
                "tokenizer.pad_token",
                "the tokenizer has no pad token, so batches cannot be padded",
                "set tokenizer.pad_token (e.g. to its eos or unk token) before building the processor",
            )

    # -- ids --
    @property
    def image_token_id(self) -> int:
        return self.format.image_token_id

    @property
    def fake_image_token_id(self) -> int | None:
        return self.format.fake_image_token_id

    @property
    def end_of_chunk_token_id(self) -> int | None:
        return self.format.end_of_chunk_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_size(self) -> int:
        return self.image_transform.image_size

    # -- the call --
    def __call__(
        self,
        prompts: Any = None,
        images: Any = None,
        *,
        text: str | list[str] | None = None,
        padding: str | bool = "longest",
        padding_side: str = "left",
        return_tensors: str = "pt",
        add_bos: bool = True,
        add_eos: bool = False,
        add_end_of_utterance_token: bool | None = None,
        add_generation_prompt: bool | None = None,
        max_length: int | None = None,
        truncation: bool = False,
        truncation_side: str | None = None,
        allow_urls: bool = False,
        images_root: str | Path | None = None,
        add_special_tokens: bool | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> BatchFeature:
        """Process one prompt or a batch of prompts.

        Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``pixel_values``
        (B, N_max, 3, S, S) float (rows with fewer images zero-padded; absent when the batch has
        no image) and ``image_attention_mask`` (B, T, N_max) long: 1 where the token's latest image
        at or before it is that image. With any-resolution tiling (LLaVA-NeXT, xGen-MM) ``pixel_values``
        is ``(K, max_views, 3, S, S)`` with ``image_sizes`` ``(K, 2)`` instead (see the module docstring).
        ``add_generation_prompt`` (chat only; default: when the last
        message is not the assistant's). ``truncation_side`` defaults to ``padding_side``: left
        keeps the end of the prompt (generation), right keeps its start (training); whole images
        are dropped with their tokens.

        ``text`` (or strings first) with ``images``: transformers' style (:mod:`.hf_processor`), where
        ``add_special_tokens`` (default True) lets the tokenizer add its BOS; for prompts it is ``add_bos``.
        ``pad_to_multiple_of`` rounds the padded length up.
        """
        if return_tensors != "pt":
            raise InputError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        truncation_side = truncation_side or padding_side
        if truncation_side not in ("left", "right"):
            raise InputError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        max_length = max_length if max_length is not None else self.max_length
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = self.tokens.add_end_of_utterance

        if text is not None or images is not None:  # transformers' style: text in the model's spelling
            if text is not None and prompts is not None:
                raise InputError("pass either prompts (the first argument) or text=, not both")
            text = prompts if text is None else text
            encoded = self._encode_texts(text, images, True if add_special_tokens is None else add_special_tokens,
                                         (max_length, truncation, truncation_side), allow_urls)
            chat = [True] * len(encoded[0])
        else:
            if prompts is None:
                raise InputError("nothing to process: pass a prompt, a conversation or a batch (or text= and images=)")
            if add_special_tokens is not None:
                add_bos = add_special_tokens
            rows, _ = split_batch(prompts)
            parsed = [
                parse_prompt(p, r, self.tokenizer, images_root=images_root, add_generation_prompt=add_generation_prompt,
                             default_system=self.default_system, image_token=self.tokens.image_token)
                for r, p in enumerate(rows)
            ]
            for r, row in enumerate(parsed):
                self._validate(row, r)
            encoded = self._encode(parsed, (add_bos, add_eos, add_end_of_utterance_token), max_length, truncation,
                                   truncation_side, allow_urls)
            chat = [row.is_chat for row in parsed]
        return self._assemble(encoded, chat, (padding, padding_side, max_length, pad_to_multiple_of), allow_urls)

    def _assemble(self, encoded, chat: list[bool], pad, allow_urls: bool) -> BatchFeature:
        """Rows' (ids, images, counts) -> the padded batch; ``pad``: (padding, side, max_length, multiple)."""
        all_ids, all_images, all_counts = encoded
        sized = self.format.sized_images  # LLaVA-NeXT: images are loaded first, their sizes set their tokens
        tiled = self.format.tiled_images  # LLaVA-NeXT and xGen-MM: every image's views
        padding, padding_side, max_length, multiple = pad
        if multiple is not None and (not isinstance(multiple, int) or multiple < 1):
            raise InputError(f"pad_to_multiple_of must be a positive integer, got {multiple!r}")
        if multiple:
            longest = max(len(ids) for ids in all_ids)
            padding, max_length = "max_length", -(-longest // multiple) * multiple
        input_ids, attention_mask = self._pad(all_ids, padding, padding_side, max_length)
        n_max = max(len(images) for images in all_images)
        reset_after_eos = [self.format.resets_image_after_eos(c) for c in chat]
        data: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_attention_mask": self.image_attention_mask(input_ids, n_max, reset_after_eos,
                                                              all_counts if sized else None),
        }
        if tiled:
            if n_max > 0:
                data["pixel_values"], data["image_sizes"] = tiled_pixels(
                    [img for row in all_images for img in row], self.anyres, self.image_transform.mean,
                    self.image_transform.std)
        elif n_max > 0:
            pixels = self._pixels(all_images, n_max, allow_urls)  # (B, N_img, 3, S, S)
            if self.images_key == "batch_images":
                data["batch_images"] = pixels[:, :, None]  # (B, N_img, 1, 3, S, S)
            else:
                data["pixel_values"] = pixels
        elif self.images_key == "batch_images":  # InfiMM's callers read it unconditionally; never encoded
            s = self.image_size
            data["batch_images"] = torch.zeros((input_ids.shape[0], 1, 1, 3, s, s), dtype=torch.float32)
        return BatchFeature(data=data)

    # -- steps --
    def _encode(self, parsed: list[ParsedPrompt], flags, max_length, truncation: bool, side: str, allow_urls: bool):
        """Render, tokenise and fit every row -> (ids, images, counts) per row; ``flags``: (add_bos,
        add_eos, add_end_of_utterance). ``counts``: each image's token count when it depends on the
        image (LLaVA-NeXT, whose images are loaded here to read their sizes), else None."""
        sized = self.format.sized_images
        tiled = self.format.tiled_images
        loaded = [self._load_row(row, allow_urls) for row in parsed] if tiled else [row.images for row in parsed]
        texts = [self._render(row, images, flags) for row, images in zip(parsed, loaded)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        all_ids, all_images, all_counts = [], [], []
        for r, (ids, row, images) in enumerate(zip(encoded, parsed, loaded)):
            counts = [self.format.image_token_count(img) for img in images] if sized else None
            lengths = self.image_lengths(images) if self.format.xgenmm_images else None
            ids, images, counts = self._fit(ids, row, (images, lengths), counts, r, max_length, truncation, side)
            all_ids.append(ids)
            all_images.append(images)
            all_counts.append(counts)
        return all_ids, all_images, all_counts

    def _render(self, row: ParsedPrompt, images: list, flags) -> str:
        """One parsed row as text, its images (loaded or not) in their places; ``flags`` as in :meth:`_encode`."""
        pending = iter(images)
        segments = [s.text if isinstance(s, Text) else next(pending) for s in row.segments]
        return self.format.render(segments, row.is_chat, *flags)

    def render(self, prompt: Any, *, add_bos: bool = True, add_eos: bool = False,
               add_end_of_utterance_token: bool | None = None, add_generation_prompt: bool | None = None,
               allow_urls: bool = False, images_root: str | Path | None = None) -> str:
        """The text one prompt (a list of text and images, or chat messages) is tokenized from, with each
        image written as the prompt format spells it; the arguments are :meth:`__call__`'s."""
        rows, batched = split_batch(prompt)
        if batched and len(rows) != 1:
            raise InputError(f"render takes one prompt, got a batch of {len(rows)}; render each row on its own")
        row = parse_prompt(rows[0], 0, self.tokenizer, images_root=images_root,
                           add_generation_prompt=add_generation_prompt, image_token=self.tokens.image_token)
        self._validate(row, 0)
        images = self._load_row(row, allow_urls) if self.format.tiled_images else row.images
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = self.tokens.add_end_of_utterance
        return self._render(row, images, (add_bos, add_eos, add_end_of_utterance_token))

    def _validate(self, row: ParsedPrompt, r: int) -> None:
        typed = row.typed_texts()
        if not row.images and not any(t.text.strip() for t in typed):
            raise InputError(f"batch row {r}: the prompt is empty (no text and no images); give it some text or an image")
        if len(row.images) > self.max_images:
            raise InputError(
                f"batch row {r}: {len(row.images)} images, more than max_images={self.max_images}; pass fewer "
                f"images, or raise the limit with InterleafProcessor(..., max_images=N) "
                "(or processor.max_images = N)"
            )
        for t in typed:
            for tok in self.format.literal_tokens():
                if tok in t.text:
                    raise InputError(
                        f"{t.where}: the text contains {tok!r} typed literally; images must be passed as images "
                        "(a PIL image, path, bytes or {'image': ...} item), and the processor writes their tokens"
                    )

    def _load_row(self, row: ParsedPrompt, allow_urls: bool) -> list[LoadedImage]:
        """A row's images, loaded (their sizes decide their token counts under LLaVA-NeXT tiling)."""
        return [LoadedImage(load_image(ref.source, where=ref.where, max_pixels=self.max_pixels, allow_urls=allow_urls),
                             ref.where) for ref in row.images]

    def _fit(self, ids, row: ParsedPrompt, images_lengths, counts, r: int, max_length, truncation: bool, side: str):
        """Check one encoded row's image tokens, and fit it into ``max_length`` -> (ids, images, counts).

        ``images_lengths``: (images, lengths), ``lengths`` each image's positions in the LM's sequence when
        the model grows its one token (xGen-MM), else None. ``counts``: each image's token count when it
        depends on the image (LLaVA-NeXT), else None."""
        images, lengths = images_lengths
        found = self.format.count_images(ids, row.is_chat, counts)
        expected = sum(counts) if counts is not None else len(images) * self.format.image_token_count()
        if found != len(images) or (self.format.is_llava and sum(1 for i in ids if i == self.image_token_id)
                                    != expected):  # a template or tokenizer quirk; never silently misalign images
            raise InputError(
                f"batch row {r}: {found} image tokens for {len(images)} images after tokenization; "
                "check that the chat template keeps every message and that the tokenizer keeps "
                f"{self.tokens.image_token!r} as one token"
            )
        grown = len(ids) + (sum(lengths) - len(lengths) if lengths else 0)
        if max_length is not None and grown > max_length:
            if not truncation:
                inserted = f" once its images are inserted ({len(ids)} text tokens, images of {lengths})" if lengths \
                    else ""
                raise InputError(
                    f"batch row {r}: the prompt is {grown} tokens{inserted}, longer than max_length={max_length} "
                    "(the model's context); shorten it, use fewer images, or pass truncation=True"
                )
            if lengths:
                return self._truncate_grown(ids, images, lengths, max_length, side, r, row.is_chat)
            ids, images, counts = self._truncate(ids, images, counts, max_length, side, r, row.is_chat)
        return ids, images, counts

    def _truncate_grown(self, ids, images, lengths, max_length, side, r, chat):
        """:meth:`_truncate` for rows whose images the model grows (xGen-MM): each ``<image>`` token weighs its
        image's grown length, and the row keeps the most tokens from its kept end whose weights fit
        ``max_length`` (an image is one token, so no cut splits it)."""
        weights = [1] * len(ids)
        for (start, _), length in zip(self.format.image_spans(ids, chat), lengths):
            weights[start] = length
        bos_id = self.tokenizer.bos_token_id
        head = 1 if side == "left" and bos_id is not None and ids[:1] == [bos_id] else 0
        order = range(len(ids) - 1, head - 1, -1) if side == "left" else range(len(ids))
        total, kept = head, head
        for p in order:
            if total + weights[p] > max_length:
                break
            total += weights[p]
            kept += 1
        ids, images, _ = self._truncate(ids, images, None, kept, side, r, chat)
        return ids, images, None

    def _truncate(self, ids, images, counts, max_length, side, r, chat):
        """Cut a row to ``max_length`` tokens without splitting an image's tokens (BOS stays first
        when the start is cut)."""
        bos_id = self.tokenizer.bos_token_id
        keep_bos = side == "left" and bos_id is not None and ids[:1] == [bos_id]
        head = ids[:1] if keep_bos else []
        body = ids[1:] if keep_bos else ids
        budget = max_length - len(head)
        if side == "left":
            cut, dropped = self.format.cut_left(body, budget, chat, counts)
            kept, images = body[cut:], images[dropped:]
            counts = counts[dropped:] if counts is not None else None
        else:
            cut, n_kept = self.format.cut_right(body, budget, chat, counts)
            kept, images = body[:cut], images[:n_kept]
            counts = counts[:n_kept] if counts is not None else None
        if not kept or (len(kept) == 1 and kept[0] == bos_id):
            raise InputError(
                f"batch row {r}: cannot truncate the prompt to max_length={max_length}: nothing but the BOS "
                "token fits without cutting through an image's tokens; raise max_length or shorten the prompt"
            )
        return head + kept, images, counts

    def _pad(self, rows: list[list[int]], padding, side: str, max_length: int | None):
        return pad_rows(rows, self.pad_token_id, padding, side, max_length)

    def image_attention_mask(
        self, input_ids: torch.Tensor, num_images: int, reset_after_eos: list[bool] | bool = False,
        counts: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, N) long: 1 where the token's latest image at or before it is image n
        (see :func:`interleaf.processing.layout.image_attention_mask`)."""
        return image_attention_mask(input_ids, num_images, self.format, self.tokenizer.eos_token_id,
                                    reset_after_eos, counts)

    def _pixels(self, all_images: list[list[ImageRef]], n_max: int, allow_urls: bool) -> torch.Tensor:
        s = self.image_size
        pixels = torch.zeros((len(all_images), n_max, 3, s, s), dtype=torch.float32)  # (B, N_max, 3, S, S)
        for b, images in enumerate(all_images):
            for n, ref in enumerate(images):
                img = load_image(ref.source, where=ref.where, max_pixels=self.max_pixels, allow_urls=allow_urls)
                pixels[b, n] = self.image_transform(img)
        return pixels

    def image_lengths(self, images: list) -> list[int]:
        """The positions each image takes in the LM's sequence once the model has placed it.

        ``images``: PIL images, anything with a ``size`` (width, height), or such pairs. xGen-MM: its
        views times ``tokens.image_lm_length`` (one ``<image>`` token in the text, grown by the model; 1
        when that is unknown); LLaVA and LLaVA-NeXT: its ``<image>`` tokens; other families: its image
        token. An image too small or too large for the grids is refused by name.
        """
        return [self.format.lm_token_count(img) for img in images]

    def process_images(self, images: list, *, where: str = "image", allow_urls: bool = False) -> torch.Tensor:
        """A list of images -> (N, 3, S, S), with the processor's limits."""
        out = [
            self.image_transform(
                load_image(img, where=f"{where} {i}", max_pixels=self.max_pixels, allow_urls=allow_urls)
            )
            for i, img in enumerate(images)
        ]
        return torch.stack(out) if out else torch.zeros((0, 3, self.image_size, self.image_size))

    # -- decoding --
    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- save / load --
    def to_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "tokens": dataclasses.asdict(self.tokens),
            "image_transform": self.image_transform.to_dict(),
            "max_images": self.max_images,
            "max_pixels": self.max_pixels,
            "max_length": self.max_length,
            "images_key": self.images_key,
            "anyres": dataclasses.asdict(self.anyres) if self.anyres is not None else None,
            "default_system": self.default_system,
        }

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the tokenizer and ``processor_config.json`` into ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        (path / PROCESSOR_CONFIG).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> "InterleafProcessor":
        """Load a saved processor offline. ``overrides``: max_images, max_pixels, max_length."""
        path = Path(directory)
        if not path.is_dir():
            raise CheckpointError(f"processor directory {str(path)!r} does not exist; pass a save_pretrained directory")
        missing = [name for name in (PROCESSOR_CONFIG, *_TOKENIZER_FILES) if not (path / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{str(path)!r} is not a complete processor directory: missing {', '.join(missing)}; "
                "save one with processor.save_pretrained(dir)"
            )
        config = read_json(path / PROCESSOR_CONFIG, "processor directory", error=CheckpointError)
        for key in _HUB_LOADING_KWARGS:  # passed by transformers' AutoProcessor; everything here is local
            overrides.pop(key, None)
        unknown = set(overrides) - {"max_images", "max_pixels", "max_length", "images_key", "default_system"}
        if unknown:
            raise InputError(f"from_pretrained: unknown overrides {sorted(unknown)}; known: max_images, max_pixels, "
                             "max_length, images_key, default_system")
        for key in ("tokens", "image_transform"):
            if key not in config:
                raise CheckpointError(f"{str(path / PROCESSOR_CONFIG)!r} lacks the {key!r} section")
        tokenizer = load_tokenizer(path)
        limits = {k: config.get(k) for k in ("max_images", "max_pixels", "max_length", "images_key", "anyres",
                                             "default_system")
                  if k in config}
        limits.update(overrides)
        return cls(
            tokenizer,
            TokensConfig(**config["tokens"]),
            ImageTransform.from_dict(config["image_transform"]),
            **limits,
        )

    def __repr__(self) -> str:
        return (
            f"InterleafProcessor(format={self.tokens.prompt_format!r}, {self.image_transform!r}, "
            f"max_images={self.max_images}, max_length={self.max_length})"
        )
