"""Tokenisation and loss masks for the three sample kinds, in the processor's prompt format.

Images, chat turns, image spans and truncation are written by the processor's
:class:`~interleaf.processing.prompt_format.PromptFormat` (``processor.format``), the same
object the processor prompts the model with.

Every function returns a :class:`Tokenized` (``input_ids``, ``labels`` with -100 where the loss
is off, and how many images the tokens hold); :func:`encode_sample` adds the images and truncation
and gives the training sample dict::

    {"input_ids": list[int], "labels": list[int], "lm_length": int, "images": list[Tensor (3, S, S)],
     "source": str, "loss_weight": float, "key": str}

(``lm_length``: the length of the row the LM sees, ``len(input_ids)`` unless the model grows images;
under any-resolution tiling each image is its views ``(1+N, 3, S, S)`` and the dict holds
``"image_sizes"``, see below.)

What is trained (``[...]``), by prompt format (BOS first when the tokenizer uses one):

- pairs, "openflamingo": ``<s><image>{task prompt}[{caption}<|endofchunk|></s>]``
- pairs, "idefics":      ``<s><fake><image><fake>{task prompt}[{caption}</s>]``
- documents, "openflamingo" (MMC4): ``<s>{text}<image>[{text}<|endofchunk|>]<image>[{text}<|endofchunk|>]</s>``:
  nothing before the first image, nothing after an ``<|endofchunk|>`` until the next image (so
  not the final EOS); ``<|endofchunk|>`` closes each image's chunk.
- documents, "idefics": the same rule, images as ``<fake><image><fake>`` (consecutive images
  share a fake token), the final EOS trained (there is no end-of-chunk token).
- conversations: the tokenizer's chat template; the assistant turns (the template's
  ``{% generation %}`` blocks) are trained, never an image's tokens. Images are rendered as the
  processor renders chat images (``<|endofchunk|><image>``, or the IDEFICS fake tokens).

LLaVA-NeXT (the processor's format has :attr:`~interleaf.processing.prompt_format.PromptFormat.sized_images`):
an image's token count depends on its size, so each image is opened to read its size before it is
written. Under any-resolution tiling (:attr:`~interleaf.processing.prompt_format.PromptFormat.tiled_images`:
LLaVA-NeXT and xGen-MM instruct) an image's pixels are its anyres views ``(1+N, 3, S, S)``, as the
processor makes them, and the sample dict also holds ``"image_sizes"``, each image's original size in
the model's order, as the processor returns it: (height, width) for LLaVA-NeXT, (width, height) for
xGen-MM. An image too small or too large for the grids is a bad sample (``unreadable_image``, with the
reason).

Placement ``replace`` (xGen-MM; the format's :attr:`~interleaf.processing.prompt_format.PromptFormat.grows_images`):
each image is one ``<image>`` token in the text, which the model replaces by the image's embeddings,
so the row the LM sees is longer than the text. :attr:`Tokenized.lm_length` and the sample's
``"lm_length"`` measure that row, and ``max_length`` applies to it, as it does to the text rows of the
other placements.

Text is tokenised with special-token strings kept literal (a caption that contains ``"<image>"``
does not become an image). A task prompt is never trained. Truncation to ``max_length`` cuts
text, or drops whole trailing images with their tokens, never an image's tokens in half.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, InputError
from ..processing import anyres as anyres_tiling
from ..processing.images import load_image
from ..processing.prompt_format import IGNORE_INDEX  # defined there; importable from here too
from .formats import BadSample, Conversation, Document, ImageSource, Pair


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    n_images: int
    image_counts: list[int] | None = None  # each image's token count, when it depends on the image (LLaVA-NeXT)
    # each image's positions in the LM's sequence, when the model grows its one <image> token (placement replace)
    lm_counts: list[int] | None = None

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def lm_length(self) -> int:
        """The length of the row the LM sees: the text's, with each grown image's one token replaced
        by its ``lm_counts`` positions."""
        grown = self.lm_counts[: self.n_images] if self.lm_counts is not None else []
        return len(self.input_ids) + sum(n - 1 for n in grown)


class _Builder:
    """Appends token runs with a trained / not-trained flag."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.n_images = 0
        self.image_counts: list[int] = []
        self.lm_counts: list[int] = []

    def add(self, ids: list[int], train: bool) -> None:
        self.ids += ids
        self.labels += ids if train else [IGNORE_INDEX] * len(ids)

    def done(self, fmt) -> Tokenized:
        return Tokenized(self.ids, self.labels, self.n_images, self.image_counts if fmt.sized_images else None,
                         self.lm_counts if fmt.grows_images else None)


class _SizedImage:
    """An image source with its (width, height) read, for formats whose token count depends on it."""

    def __init__(self, processor, source: ImageSource):
        self.where = source.where
        self.size = _open(processor, source).size


def _image(processor, source: ImageSource | None):
    """What the prompt format is given for one image: its size when a count depends on it, else nothing."""
    if source is None or not (processor.format.sized_images or processor.format.lm_sized_images):
        return None
    return _SizedImage(processor, source)


def _image_ids(processor, builder: _Builder, source: ImageSource | None, last_was_image: bool) -> list[int]:
    """One image's token ids (plain prompt), noting its token count in ``builder``."""
    image = _image(processor, source)
    builder.image_counts.append(_count(processor, image))  # first: a bad image is a BadSample
    builder.lm_counts.append(_count(processor, image, lm=True))
    return processor.format.image_ids(last_was_image, chat=False, image=image)


def _count(processor, image, lm: bool = False) -> int:
    """The image's tokens in the text, or (``lm``) its positions in the LM's sequence."""
    fmt = processor.format
    try:
        return fmt.lm_token_count(image) if lm else fmt.image_token_count(image)
    except (InputError, ConfigError) as e:  # too small or too large for the grids: this sample cannot be used
        raise BadSample("unreadable_image", getattr(image, "where", "image"), str(e)) from e


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of plain text; special-token strings in it stay ordinary text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _start(processor) -> _Builder:
    b = _Builder()
    if processor.format.training_starts_with_bos():
        b.add([processor.tokenizer.bos_token_id], train=False)
    return b


def _eos(processor) -> list[int]:
    eos = processor.tokenizer.eos_token_id
    return [] if eos is None else [eos]


def tokenize_pair(
    processor, caption: str, *, task_prompt: str | None = None, image: ImageSource | None = None
) -> Tokenized:
    """One image and its caption; the loss is on the caption and what ends it. ``image`` is needed
    when the image's token count depends on it (LLaVA-NeXT)."""
    tok = processor.tokenizer
    b = _start(processor)
    b.add(_image_ids(processor, b, image, False), train=False)
    b.n_images = 1
    if task_prompt:
        b.add(text_ids(tok, task_prompt), train=False)
        caption = " " + caption
    b.add(text_ids(tok, caption), train=True)
    if processor.format.closes_chunks:
        b.add([processor.end_of_chunk_token_id], train=True)
    b.add(_eos(processor), train=True)
    return b.done(processor.format)


def tokenize_document(processor, items: list) -> Tokenized:
    """Interleaved text and images (``str`` or :class:`ImageSource` items) with the MMC4 loss mask."""
    tok = processor.tokenizer
    fmt = processor.format
    closes_chunks = fmt.closes_chunks
    b = _start(processor)
    seen_image = chunk_open = last_was_image = False
    previous_text = False
    for item in items:
        if isinstance(item, ImageSource):
            if closes_chunks and chunk_open:
                b.add([processor.end_of_chunk_token_id], train=True)
            b.add(_image_ids(processor, b, item, last_was_image), train=False)
            b.n_images += 1
            seen_image = chunk_open = last_was_image = True
            previous_text = False
            continue
        text = (" " + item) if previous_text else item
        b.add(text_ids(tok, text), train=seen_image)
        previous_text, last_was_image = True, False
    if closes_chunks:
        if chunk_open:
            b.add([processor.end_of_chunk_token_id], train=True)
        b.add(_eos(processor), train=False)
    else:
        b.add(_eos(processor), train=seen_image)
    return b.done(processor.format)


def tokenize_conversation(processor, conversation: Conversation) -> Tokenized:
    """Chat messages through the tokenizer's chat template; loss on the assistant turns only."""
    tok = processor.tokenizer
    where = conversation.key
    if getattr(tok, "chat_template", None) is None:
        raise InputError(
            "conversation data needs a chat template but the tokenizer has none; set tokenizer.chat_template "
            "(with {% generation %} around assistant turns)"
        )
    messages, counts, lm_counts = [], [], []
    for message in conversation.messages:
        parts: list[str] = []
        last_was_image = False
        for part in message["content"]:
            if isinstance(part, ImageSource):
                image = _image(processor, part)
                counts.append(_count(processor, image))
                lm_counts.append(_count(processor, image, lm=True))
                parts.append(processor.format.image_text(last_was_image, chat=True, image=image))
                last_was_image = True
            else:
                parts.append(part)
                last_was_image = False
        messages.append({"role": message["role"], "content": "".join(parts)})
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=False
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise InputError(
            "the tokenizer's chat template marks no assistant tokens, so nothing would be trained; wrap the "
            "assistant turns in {% generation %} ... {% endgeneration %} (see processing/chat_templates/chatml.jinja)"
        )
    n_images = len(conversation.images)
    counts = counts if processor.format.sized_images else None
    found = processor.format.count_images(ids, chat=True, counts=counts)
    if found != n_images:
        raise BadSample("image_mismatch", where, f"{found} image tokens for {n_images} images after the chat template")
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    for s, e in processor.format.image_spans(ids, chat=True, counts=counts):
        labels[s:e] = [IGNORE_INDEX] * (e - s)
    return Tokenized(ids, labels, n_images, counts, lm_counts if processor.format.grows_images else None)


def _text_budget(processor, t: Tokenized, max_length: int) -> int:
    """The most leading text tokens whose row in the LM (grown images at their length) fits ``max_length``."""
    if t.lm_counts is None:
        return max_length
    image, grown = processor.format.image_token_id, iter(t.lm_counts)
    used = 0
    for p, tok in enumerate(t.input_ids):
        used += next(grown, 1) if tok == image else 1
        if used > max_length:
            return p
    return len(t.input_ids)


def truncate(processor, t: Tokenized, max_length: int, *, chat: bool) -> Tokenized:
    """Keep at most ``max_length`` positions of the LM's row (:attr:`Tokenized.lm_length`); a cut
    inside an image's tokens, or one that leaves no room for a grown image, drops that whole image."""
    if t.lm_length <= max_length:
        return t
    cut, kept = processor.format.cut_right(t.input_ids, _text_budget(processor, t, max_length), chat, t.image_counts)
    counts = t.image_counts[:kept] if t.image_counts is not None else None
    lm_counts = t.lm_counts[:kept] if t.lm_counts is not None else None
    return Tokenized(t.input_ids[:cut], t.labels[:cut], kept, counts, lm_counts)


def _open(processor, source: ImageSource):
    """The image of ``source`` as a PIL image, or a :class:`BadSample` naming it."""
    try:
        img = load_image(source.value, where=source.where, max_pixels=processor.max_pixels)
    except InputError as e:
        reason = "missing_file" if "does not exist" in str(e) else "unreadable_image"
        raise BadSample(reason, source.where, str(e)) from e
    except Exception as e:  # any decoder failure on a corrupt file is one bad sample, never a crash
        raise BadSample("unreadable_image", source.where, f"{type(e).__name__}: {e}") from e
    return img


def _load(processor, source: ImageSource, img=None):
    """The pixels of one image: ``(3, S, S)``, or its anyres views ``(1+N, 3, S, S)`` under any-resolution
    tiling (LLaVA-NeXT, xGen-MM)."""
    img = img if img is not None else _open(processor, source)
    if not processor.format.tiled_images:
        return processor.image_transform(img)  # (3, S, S)
    transform = processor.image_transform
    try:
        views, _ = anyres_tiling.pixel_values(img, processor.anyres, transform.mean, transform.std, where=source.where)
    except (InputError, ConfigError) as e:
        raise BadSample("unreadable_image", source.where, str(e)) from e
    return views


def encode_sample(
    parsed: Pair | Document | Conversation,
    processor,
    *,
    source: str,
    max_length: int | None = None,
    max_images: int = 6,
    task_prompt: str | None = None,
    loss_weight: float = 1.0,
) -> dict:
    """A parsed sample -> the training sample dict (raises :class:`BadSample` if unusable)."""
    images = [parsed.image] if isinstance(parsed, Pair) else parsed.images
    if len(images) > max_images:
        raise BadSample("too_many_images", parsed.key, f"{len(images)} images, more than max_images={max_images}")
    chat = isinstance(parsed, Conversation)
    if isinstance(parsed, Pair):
        t = tokenize_pair(processor, parsed.caption, task_prompt=task_prompt, image=parsed.image)
    elif isinstance(parsed, Document):
        t = tokenize_document(processor, parsed.items)
    else:
        t = tokenize_conversation(processor, parsed)  # the task prompt is already in its first turn
    if max_length is not None:
        t = truncate(processor, t, max_length, chat=chat)
    if t.n_trained == 0:
        raise BadSample("no_trainable_tokens", parsed.key, f"no trained token in {len(t.input_ids)} tokens")
    opened = [_open(processor, img) for img in images[: t.n_images]]
    pixels = [_load(processor, src, img) for src, img in zip(images, opened)]
    sample = {
        "input_ids": t.input_ids,
        "labels": t.labels,
        "lm_length": t.lm_length,  # the row the LM sees (longer than input_ids when the model grows images)
        "images": pixels,
        "source": source,
        "loss_weight": float(loss_weight),
        "key": parsed.key,
    }
    if processor.format.tiled_images:  # each image's original size, in the model's order (as the processor's)
        sample["image_sizes"] = [anyres_tiling.model_size(processor.anyres, img.size) for img in opened]
    return sample


def render_sample(tokenizer, input_ids: list[int], labels: list[int], open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The exact tokens as text, with each run of trained tokens wrapped in ``[[ ]]``."""
    out: list[str] = []
    run: list[int] = []
    trained = False
    for tok_id, label in [*zip(input_ids, labels), (None, None)]:
        now = label is not None and label != IGNORE_INDEX
        if tok_id is None or (run and now != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{open_mark}{text}{close_mark}" if trained else text)
            run = []
        if tok_id is not None:
            run.append(tok_id)
            trained = now
    return "".join(out)


__all__ = [
    "IGNORE_INDEX", "Tokenized", "encode_sample", "render_sample", "text_ids", "tokenize_conversation",
    "tokenize_document", "tokenize_pair", "truncate",
]
