"""Parsing interleaved prompts and chat conversations into text and image segments.

A prompt is a list mixing text and images; a chat conversation is a list of messages
``{"role": ..., "content": str | list of parts}``. Both become a :class:`ParsedPrompt`: a list of
:class:`Text` and :class:`ImageRef` segments, with chat conversations already rendered by the
tokenizer's chat template (images come back in the place their part had in the message).
Every problem raises :class:`~interleaf.errors.InputError` naming the batch row and item.

Chat templates come in two kinds, told apart by :func:`template_wants_parts`:

- *string content* (interleaf's own templates, most text-only ones): each message's content is
  handed to the template as one string in which every image stands as a private-use character;
  the image comes back exactly where its part was in the message.
- *list content* (transformers' multimodal processors' templates, such as the llava-hf
  checkpoints' ``chat_template.json``): the template loops over ``message['content']`` as a list of
  ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts and writes the model's image
  token (``tokens.image_token``, ``<image>``) itself for each image part; with string content it
  renders nothing of the message. Such a template gets list content, and each image token it
  writes becomes one image, in the conversation's order (a template may move a message's images
  before its text, as LLaVA's do; the images keep their order). The prompt format then spells
  each image as its family does (LLaVA: one ``<image>`` per vision token), once per image part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from ..errors import InputError

ACCEPTED_ITEMS = (
    "text (str, or {'type': 'text', 'text': ...}), or an image: a PIL.Image.Image, a pathlib.Path, "
    "bytes, a 'data:image/...;base64,...' or http(s) URL string, {'image': x}, "
    "{'type': 'image', 'image': x}, or {'type': 'image_url', 'image_url': {'url': ...}}"
)
CHAT_ROLES = ("system", "user", "assistant")
# Stands for an image while a conversation goes through the chat template (Unicode private use).
IMAGE_SENTINEL = "\ue000"
# The text of the conversation that tells which way a chat template takes message content.
_PROBE = "\ue001"


@dataclass
class Text:
    text: str
    where: str


@dataclass
class ImageRef:
    source: Any  # anything load_image accepts
    where: str


Segment = Union[Text, ImageRef]


@dataclass
class ParsedPrompt:
    """One batch row: its segments, and whether it came from a chat conversation."""

    segments: list[Segment] = field(default_factory=list)
    is_chat: bool = False
    user_texts: list[Text] | None = None  # chat: the message texts; plain prompts: the Text segments

    def typed_texts(self) -> list[Text]:
        if self.user_texts is not None:
            return self.user_texts
        return [s for s in self.segments if isinstance(s, Text)]

    @property
    def images(self) -> list[ImageRef]:
        return [s for s in self.segments if isinstance(s, ImageRef)]


def _is_message(obj: Any) -> bool:
    return isinstance(obj, dict) and "role" in obj


def _is_url_string(text: str) -> bool:
    stripped = text.strip()
    if stripped.startswith("data:image/"):
        return True
    return stripped.startswith(("http://", "https://")) and not any(c.isspace() for c in stripped)


def split_batch(prompts: Any) -> tuple[list[Any], bool]:
    """``prompts`` -> (list of row prompts, whether a batch was given)."""
    if isinstance(prompts, (str, dict, Image.Image, bytes, Path)):
        return [[prompts]], False
    if not isinstance(prompts, (list, tuple)):
        raise InputError(
            f"prompts: expected one prompt (a list of text and images, or of chat messages) or a batch "
            f"(a list of such lists), got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise InputError("prompts: the batch is empty; pass at least one prompt")
    nested = [isinstance(p, (list, tuple)) for p in prompts]
    if all(nested):
        return list(prompts), True
    if any(nested):
        first = nested.index(True)
        raise InputError(
            f"prompts: item {first} is a list but other items are not; pass either one prompt "
            "(a flat list of text and images) or a batch (a list of prompts, each a list)"
        )
    return [list(prompts)], False


def classify_item(item: Any, where: str, images_root: str | Path | None = None) -> Segment:
    """One prompt item (or message part) -> a text or image segment."""
    if isinstance(item, str):
        return ImageRef(item.strip(), where) if _is_url_string(item) else Text(item, where)
    if isinstance(item, (Image.Image, bytes, bytearray, memoryview)):
        return ImageRef(item, where)
    if isinstance(item, Path):
        return ImageRef(_resolve(item, images_root, where), where)
    if isinstance(item, dict):
        kind = item.get("type")
        if kind == "text" or (kind is None and set(item) == {"text"}):
            text = item.get("text")
            if not isinstance(text, str):
                raise InputError(f"{where}: a text part needs a string 'text', got {type(text).__name__}")
            return Text(text, where)
        if kind == "image_url":
            url = item.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise InputError(f"{where}: an image_url part needs {{'image_url': {{'url': '...'}}}}, got {item!r}")
            return ImageRef(url.strip(), where)
        if kind in ("image", None):
            for key in ("image", "path", "url"):
                if key in item:
                    source = item[key]
                    if isinstance(source, (str, Path)) and not (isinstance(source, str) and _is_url_string(source)):
                        source = _resolve(Path(source), images_root, where)
                    return ImageRef(source, where)
        raise InputError(f"{where}: unsupported dict with keys {sorted(item)}; a prompt item is {ACCEPTED_ITEMS}")
    raise InputError(f"{where}: unsupported object of type {type(item).__name__}; a prompt item is {ACCEPTED_ITEMS}")


def _resolve(path: Path, images_root: str | Path | None, where: str = "image") -> Path:
    try:
        path = path.expanduser()
    except RuntimeError as e:  # "~someone" for an unknown user
        raise InputError(f"{where}: cannot expand '~' in the image path {str(path)[:80]!r} ({e}); write the full path") from e
    if images_root is not None and not path.is_absolute():
        return Path(images_root) / path
    return path


def parse_prompt(
    prompt: list,
    row: int,
    tokenizer,
    *,
    images_root: str | Path | None = None,
    add_generation_prompt: bool | None = None,
    default_system: str | None = None,
    image_token: str = "<image>",
) -> ParsedPrompt:
    """Parse one batch row (a list of items, or a list of chat messages).

    ``default_system``: a chat conversation whose first message is not a system message gets a
    system message with this content before the chat template renders it (InfiMM's processor
    inserts one with empty content); ``None`` inserts nothing. ``image_token``: the model's image
    token (``tokens.image_token``), which a list-content chat template writes for each image part
    (see the module docstring).
    """
    if not isinstance(prompt, (list, tuple)):
        raise InputError(f"batch row {row}: a prompt must be a list of text and images, got {type(prompt).__name__}")
    if prompt and all(_is_message(m) for m in prompt):
        return _parse_chat(list(prompt), row, tokenizer, images_root, add_generation_prompt, image_token,
                           default_system)
    if any(_is_message(m) for m in prompt):
        first = next(i for i, m in enumerate(prompt) if _is_message(m))
        raise InputError(
            f"batch row {row}, prompt item {first}: a chat message inside a plain prompt; a row is either "
            "a list of chat messages {'role', 'content'} or a list of text and images, not both"
        )
    segments = [
        classify_item(item, f"batch row {row}, prompt item {i}", images_root) for i, item in enumerate(prompt)
    ]
    return ParsedPrompt(segments, is_chat=False)


def template_wants_parts(tokenizer) -> bool:
    """Whether the tokenizer's chat template needs message content as a list of parts.

    The template renders a probe conversation (one user message) twice: its content a string, then
    a list of one text part. A template that shows the probe's text from the string takes string
    content (what interleaf hands every template by default); one that shows it only from the list
    iterates over the parts (``{% for part in message['content'] %}``, or
    ``selectattr('type', 'equalto', 'text')`` as transformers' LLaVA templates do). A rendering
    that raises counts as not showing the text; a template that shows it neither way is treated as
    a string-content one (and fails as it did before when a conversation goes through it). The
    answer is remembered on the tokenizer for its current template, so the probe runs once.
    """
    def shows(content) -> bool:
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        except Exception:  # a template that refuses the probe does not take content that way
            return False
        return isinstance(rendered, str) and _PROBE in rendered

    template = getattr(tokenizer, "chat_template", None)
    known = getattr(tokenizer, "_interleaf_wants_parts", None)  # (template, answer): one probe per template
    if known is not None and known[0] == template:
        return known[1]
    answer = not shows(_PROBE) and shows([{"type": "text", "text": _PROBE}])
    try:
        tokenizer._interleaf_wants_parts = (template, answer)
    except AttributeError:  # a tokenizer that takes no attributes: probe every time
        pass
    return answer


def _parse_chat(messages, row, tokenizer, images_root, add_generation_prompt, image_token,
                default_system=None) -> ParsedPrompt:
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(
            f"batch row {row}: chat messages need a chat template but the tokenizer has none; set "
            "tokenizer.chat_template, or pass the prompt as a list of text and images"
        )
    as_parts = template_wants_parts(tokenizer)
    rendered_messages = []
    images: list[ImageRef] = []
    typed: list[Text] = []  # the user's own words, for checks the template's text must not trip
    for m, message in enumerate(messages):
        where = f"batch row {row}, message {m}"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InputError(f"{where}: role must be one of {list(CHAT_ROLES)}, got {role!r}")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, (list, tuple)):
            raise InputError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
        segments = [classify_item(part, f"{where}, part {p}", images_root) for p, part in enumerate(parts)]
        for seg in segments:
            if isinstance(seg, ImageRef):
                images.append(seg)
            else:
                _check_typed(seg, image_token if as_parts else None)
                typed.append(seg)
        rendered_messages.append({"role": role, "content": _content(segments, as_parts)})
    if default_system is not None and rendered_messages[0]["role"] != "system":
        rendered_messages.insert(0, {"role": "system", "content": _content([Text(default_system, "system")], as_parts)})
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1].get("role") != "assistant"
    rendered = tokenizer.apply_chat_template(rendered_messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    pieces = rendered.split(image_token if as_parts else IMAGE_SENTINEL)
    if len(pieces) - 1 != len(images):
        wrote = f"wrote {image_token!r} {len(pieces) - 1} times for" if as_parts else f"kept {len(pieces) - 1} of"
        raise InputError(
            f"batch row {row}: the chat template {wrote} the conversation's {len(images)} images (it drops or "
            "repeats some message content); use a template that renders every message"
            + (f" and writes {image_token!r} once for each image part" if as_parts else "")
        )
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        if piece:
            segments.append(Text(piece, f"batch row {row} (chat text)"))
        if i < len(images):
            segments.append(images[i])
    return ParsedPrompt(segments, is_chat=True, user_texts=typed)


def _check_typed(seg: Text, image_token: str | None) -> None:
    """A text part may not hold what stands for an image in the template's output: the image token a
    list-content template writes (``image_token``), else the private-use character (``None``)."""
    if image_token is None and IMAGE_SENTINEL in seg.text:
        raise InputError(f"{seg.where}: the text holds the reserved character U+E000; remove it")
    if image_token is not None and image_token in seg.text:
        raise InputError(
            f"{seg.where}: the text contains {image_token!r} typed literally; images must be passed as images "
            "(a PIL image, path, bytes or {'image': ...} item), and the processor writes their tokens"
        )


def _content(segments: list[Segment], as_parts: bool) -> str | list[dict]:
    """A message's content for the chat template: one string with :data:`IMAGE_SENTINEL` for each image, or
    (list-content templates) text and image parts."""
    if as_parts:
        return [{"type": "image"} if isinstance(s, ImageRef) else {"type": "text", "text": s.text} for s in segments]
    return "".join(IMAGE_SENTINEL if isinstance(s, ImageRef) else s.text for s in segments)
