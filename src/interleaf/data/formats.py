"""Readers for the three on-disk training formats, yielding raw samples lazily.

::

    pairs shard (.tar)       {key}.jpg|jpeg|png|webp + {key}.txt or {key}.json {"caption"|"text"}
        └─ iter_tar_samples ─► TarSample(key, fields {ext: bytes}) ─► parse_pair ─► Pair
    documents shard (.tar)   {key}.json {"texts": [...], "images": [...]} + {key}.0.png, ...
        └─ iter_tar_samples ─► TarSample ─► parse_document ─► Document (items in reading order)
    LLaVA JSON / JSON lines  [{"id", "image": str | [str] | absent, "conversations": [...]}]
        └─ load_llava ─► list of records ─► parse_conversation ─► Conversation
    preference JSON / JSON lines  [{"id", "image", "prompt", "chosen", "rejected"}]
        └─ load_llava ─► list of records ─► parse_preference (data/preference.py) ─► Preference

A tar sample is a run of consecutive members sharing a key, as WebDataset groups them: the key is
the member name up to the first dot of its base name, the field is the rest
(``doc-000012.0.png`` -> key ``doc-000012``, field ``0.png``). Readers never raise on one bad
sample: a problem with a sample raises :class:`BadSample` (with a ``reason`` from
:data:`REASONS`) from the ``parse_*`` step, and a shard that cannot be read (missing, corrupt
header, truncated) yields one :class:`BadSample` in place of its remaining samples.
"""

from __future__ import annotations

import base64
import binascii
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import InputError
from ..files import iter_jsonl, read_json

FORMATS = ("pairs", "interleaved", "llava", "preference")
TABLE_EXTENSIONS = (".parquet", ".arrow")  # Hugging Face datasets' files (interleaf.data.tables reads them)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "txt", "alt", "alt_text")
LLAVA_IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Why a sample was skipped (the keys of BadSampleCounter).
REASONS = (
    "missing_file",  # a shard, image file or tar member the sample names does not exist
    "corrupt_shard",  # the tar archive cannot be read (bad header, truncated)
    "unreadable_image",  # the image bytes do not decode
    "remote_image",  # an http(s) image: interleaf never downloads while training
    "malformed_json",  # a JSON line or JSON member that does not parse or lacks required fields
    "empty_text",  # no caption, no document text, or an empty assistant answer
    "image_mismatch",  # LLaVA: <image> placeholders do not match the images given
    "too_many_images",  # more images than the source's max_images
    "no_trainable_tokens",  # nothing left to train on after truncation
)


class BadSample(Exception):
    """One sample that cannot be used; the stream skips it and counts ``reason``."""

    def __init__(self, reason: str, where: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; known: {REASONS}")
        self.reason, self.where, self.detail = reason, where, detail
        super().__init__(f"{where}: {reason}: {detail}")


# --------------------------------------------------------------------------- tar shards


@dataclass
class TarSample:
    """A group of tar members with one key: ``fields`` maps the extension (``"png"``, ``"0.png"``) to bytes."""

    key: str
    fields: dict[str, bytes]
    shard: str

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/doc-1.0.png"`` -> ``("dir/doc-1", "0.png")`` (WebDataset's key/field split)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def iter_tar_groups(
    path: str | Path, *, select: Callable[[int], bool] | None = None
) -> Iterator[TarSample | BadSample | None]:
    """Yield the samples of one shard in order.

    ``select(i)`` says whether to read sample ``i`` (counting from 0 in the shard); a sample it
    rejects is yielded as ``None`` without reading its bytes (cheap skipping and counting). A
    missing or unreadable shard yields one :class:`BadSample` and stops.
    """
    path = Path(path)
    try:
        tar = tarfile.open(path, "r:*")
    except FileNotFoundError:
        yield BadSample("missing_file", str(path), "the shard does not exist")
        return
    except (tarfile.TarError, OSError, EOFError) as e:
        yield BadSample("corrupt_shard", str(path), f"not a readable tar archive ({e})")
        return
    with tar:
        key: str | None = None
        fields: dict[str, bytes] = {}
        index, wanted = -1, False

        def finished() -> TarSample | None:
            return TarSample(key, fields, str(path)) if wanted else None

        while True:
            try:
                member = tar.next()
                if member is not None and member.isfile():
                    k, ext = split_member_name(member.name)
                    if k != key:
                        if key is not None:
                            yield finished()
                        key, fields, index = k, {}, index + 1
                        wanted = select is None or select(index)
                    if wanted:
                        handle = tar.extractfile(member)
                        fields[ext] = handle.read() if handle is not None else b""
            except (tarfile.TarError, OSError, EOFError) as e:  # the sample being read is lost with the rest
                yield BadSample("corrupt_shard", str(path), f"the archive is corrupt at key {key!r} ({e})")
                return
            if member is None:
                break
        if key is not None:
            yield finished()


def iter_tar_samples(paths: list[str | Path] | str | Path) -> Iterator[TarSample | BadSample]:
    """Every sample of the given shards, shard after shard, read lazily."""
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        yield from iter_tar_groups(p)


def count_tar_samples(path: str | Path) -> int:
    """The number of samples in a shard (reads headers only)."""
    return sum(1 for s in iter_tar_groups(path, select=lambda i: False) if not isinstance(s, BadSample))


def _json_field(sample: TarSample, name: str = "json") -> Any:
    try:
        return json.loads(sample.fields[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("malformed_json", sample.where, f"member {sample.key}.{name} is not valid JSON ({e})") from e


# --------------------------------------------------------------------------- parsed samples


@dataclass
class ImageSource:
    """Where one image comes from: raw bytes, a file path, or a data URL (``kind``)."""

    value: bytes | str | Path
    where: str


@dataclass
class Pair:
    image: ImageSource
    caption: str
    key: str


@dataclass
class Document:
    items: list[Union[str, ImageSource]]  # reading order
    key: str

    @property
    def images(self) -> list[ImageSource]:
        return [i for i in self.items if isinstance(i, ImageSource)]


@dataclass
class Conversation:
    """LLaVA turns as chat messages; images sit in user turns at their placeholders."""

    messages: list[dict]  # {"role", "content": list of str | ImageSource}
    key: str

    @property
    def images(self) -> list[ImageSource]:
        return [p for m in self.messages for p in m["content"] if isinstance(p, ImageSource)]


def parse_pair(sample: TarSample) -> Pair:
    """An image-text pair: the first image field and the caption (``txt``, else a JSON caption field)."""
    image = next((sample.fields[e] for e in IMAGE_EXTENSIONS if e in sample.fields), None)
    if image is None:
        raise BadSample(
            "missing_file", sample.where, f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); found {sorted(sample.fields)}"
        )
    text: str | None = None
    if "txt" in sample.fields:
        try:
            text = sample.fields["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("malformed_json", sample.where, f"the caption is not UTF-8 ({e})") from e
    elif "json" in sample.fields:
        meta = _json_field(sample)
        if isinstance(meta, dict):
            text = next((meta[k] for k in CAPTION_KEYS if isinstance(meta.get(k), str)), None)
    if text is None or not text.strip():
        raise BadSample("empty_text", sample.where, "no caption (a .txt member or a JSON 'caption'/'text' field)")
    return Pair(ImageSource(image, f"{sample.where} image"), text.strip(), sample.key)


def _inline_image(value: str, where: str) -> ImageSource | None:
    """A data URL or a bare base64 string -> an image; ``None`` if it is neither."""
    if value.startswith("data:"):
        return ImageSource(value, where)
    if len(value) > 64 and "." not in value[-6:]:
        try:
            return ImageSource(base64.b64decode(value, validate=True), where)
        except (binascii.Error, ValueError):
            return None
    return None


def parse_document(sample: TarSample) -> Document:
    """An OBELICS-style document: aligned ``texts`` / ``images`` lists -> items in reading order.

    An image entry is a member name of the same sample (``"{key}.0.png"`` or just ``"0.png"``), a
    data URL, or a base64 string.
    """
    if "json" not in sample.fields:
        raise BadSample("malformed_json", sample.where, f"no {sample.key}.json member; found {sorted(sample.fields)}")
    doc = _json_field(sample)
    texts, images = (doc.get("texts"), doc.get("images")) if isinstance(doc, dict) else (None, None)
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadSample(
            "malformed_json", sample.where, "need {'texts': [...], 'images': [...]}, two lists of equal length"
        )
    items: list[str | ImageSource] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        where = f"{sample.where} item {i}"
        if image is not None:
            if not isinstance(image, str):
                raise BadSample("malformed_json", where, f"an image entry must be a string, got {type(image).__name__}")
            if image.startswith(("http://", "https://")):
                raise BadSample("remote_image", where, f"{image[:60]!r} is a URL; download the images into the shard")
            name = image[len(sample.key) + 1 :] if image.startswith(sample.key + ".") else image
            if name in sample.fields:
                items.append(ImageSource(sample.fields[name], where))
                continue
            inline = _inline_image(image, where)
            if inline is None:
                raise BadSample("missing_file", where, f"image {image[:60]!r} is not a member of this sample")
            items.append(inline)
        elif isinstance(text, str):
            if text.strip():
                items.append(text.strip())
        elif text is not None:
            raise BadSample("malformed_json", where, f"a text entry must be a string, got {type(text).__name__}")
    if not any(isinstance(i, str) for i in items):
        raise BadSample("empty_text", sample.where, "the document has no text")
    return Document(items, sample.key)


# --------------------------------------------------------------------------- LLaVA JSON


@dataclass
class LlavaRecord:
    """One entry of a LLaVA file (or the error of a JSON line that did not parse)."""

    data: dict | None
    where: str
    error: str | None = None


def _starts_like_a_list(path: Path) -> bool:
    """Whether the first non-space character of ``path`` is ``[`` (read only as far as that character)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 16):
            rest = chunk.lstrip()
            if rest:
                return rest.startswith("[")
    return False


def load_llava(path: str | Path, kind: str = "LLaVA") -> list[LlavaRecord]:
    """Every entry of a LLaVA JSON list or JSON-lines file, in order (``kind`` names the file in
    errors: ``"LLaVA"``, ``"preference"``).

    A file that is not JSON at all is an :class:`InputError` (the whole source is unusable); a
    broken line of a JSON-lines file becomes a record with ``error`` set (one bad sample).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} file {str(path)!r} does not exist; check the source's paths")
    what = f"{kind} file (JSON list or JSON lines)"
    try:
        starts_like_a_list = _starts_like_a_list(path)
    except OSError as e:
        raise InputError(f"{kind} file {str(path)!r} cannot be read ({e}); check its permissions") from e
    if starts_like_a_list:
        entries = read_json(path, what)
        return [LlavaRecord(e if isinstance(e, dict) else None, f"{path}[{i}]",
                            None if isinstance(e, dict) else f"entry is a {type(e).__name__}, not an object")
                for i, e in enumerate(entries)]
    records = []

    def bad_line(n: int, e: Exception) -> None:
        records.append(LlavaRecord(None, f"{path}:{n}", f"line does not parse as JSON ({e})"))

    for n, entry in iter_jsonl(path, what, on_bad_line=bad_line):
        if not isinstance(entry, dict):
            records.append(LlavaRecord(None, f"{path}:{n}", f"line is a {type(entry).__name__}, not an object"))
        else:
            records.append(LlavaRecord(entry, f"{path}:{n}"))
    return records


def map_image_path(path: str, image_path_map: dict[str, str]) -> str:
    """Replace the longest matching prefix (xGen-MM style ``{"/old/root/": "/new/root/"}``)."""
    for prefix in sorted(image_path_map, key=len, reverse=True):
        if path.startswith(prefix):
            return image_path_map[prefix] + path[len(prefix) :]
    return path


def parse_conversation(
    record: LlavaRecord,
    *,
    images_root: str | Path | None = None,
    image_path_map: dict[str, str] | None = None,
    task_prompt: str | None = None,
) -> Conversation:
    """A LLaVA entry -> chat messages with images at their ``<image>`` placeholders.

    The placeholder and a newline right after (or before) it are replaced by the image, so
    ``"<image>\\nWhat is it?"`` renders exactly like the message ``[image, "What is it?"]``. With
    no placeholder, the images go before the first human text, as LLaVA does. ``task_prompt`` is
    appended to the first human turn on a new line.
    """
    where = record.where
    if record.error is not None or record.data is None:
        raise BadSample("malformed_json", where, record.error or "not a JSON object")
    data = record.data
    key = str(data.get("id", where))
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("malformed_json", where, "needs a non-empty 'conversations' list")
    images = _llava_images(data.get("image"), where, images_root, image_path_map)
    messages, placeholders = _llava_messages(turns, images, where)
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise BadSample("malformed_json", where, "no human turn")
    if not placeholders and images:
        users[0]["content"] = list(images) + users[0]["content"]
    if task_prompt:
        content = users[0]["content"]
        if content and isinstance(content[-1], str):
            content[-1] = f"{content[-1]}\n{task_prompt}"
        else:
            content.append(task_prompt)
    answers = ["".join(p for p in m["content"] if isinstance(p, str)) for m in messages if m["role"] == "assistant"]
    if not answers or not any(a.strip() for a in answers):
        raise BadSample("empty_text", where, "no assistant answer to train on")
    return Conversation(messages, key)


def _llava_images(raw: Any, where: str, images_root: str | Path | None,
                  image_path_map: dict[str, str] | None) -> list[ImageSource]:
    """The entry's ``image`` (a path or a list of paths) as local files that exist; an entry that is
    already an :class:`ImageSource` (a parquet row's image) is kept as it is."""
    names = [] if raw is None else [raw] if isinstance(raw, (str, ImageSource)) else raw
    if not isinstance(names, list) or not all(isinstance(n, (str, ImageSource)) for n in names):
        raise BadSample("malformed_json", where, "'image' must be a path string or a list of path strings")
    images = []
    for i, name in enumerate(names):
        if isinstance(name, ImageSource):
            images.append(name)
            continue
        img_where = f"{where} image {i}"
        if name.startswith(("http://", "https://")):
            raise BadSample("remote_image", img_where, f"{name!r} is a URL; download it and give a local path")
        try:
            mapped = Path(map_image_path(name, image_path_map or {})).expanduser()
            if images_root is not None and not mapped.is_absolute():
                mapped = Path(images_root) / mapped
            usable = mapped.is_file()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, an unknown ~user
            raise BadSample("missing_file", img_where, f"image path {name[:80]!r} is not usable ({e})") from e
        if not usable:
            raise BadSample("missing_file", img_where, f"image file {str(mapped)!r} does not exist")
        images.append(ImageSource(mapped, img_where))
    return images


def _llava_messages(turns: list, images: list[ImageSource], where: str) -> tuple[list[dict], int]:
    """Chat messages for LLaVA's ``{"from", "value"}`` turns, each ``<image>`` replaced by the next
    image; and how many placeholders there were (0, or exactly one per image)."""
    messages: list[dict] = []
    placeholders = 0
    for t, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise BadSample(
                "malformed_json", f"{where} turn {t}",
                f"a turn is {{'from': one of {sorted(LLAVA_ROLES)}, 'value': str}}, got {str(turn)[:80]}",
            )
        role, value = LLAVA_ROLES[turn["from"]], turn["value"]
        if role == "assistant" and LLAVA_IMAGE_PLACEHOLDER in value:
            raise BadSample("image_mismatch", f"{where} turn {t}", "an assistant turn holds an <image> placeholder")
        pieces = value.split(LLAVA_IMAGE_PLACEHOLDER)
        content: list[str | ImageSource] = []
        for p, piece in enumerate(pieces):
            if p > 0:
                if placeholders >= len(images):
                    raise BadSample(
                        "image_mismatch", where, f"more <image> placeholders than the {len(images)} image(s) given"
                    )
                content.append(images[placeholders])
                placeholders += 1
                piece = piece[1:] if piece.startswith("\n") else piece
            if p + 1 < len(pieces) and piece.endswith("\n"):
                piece = piece[:-1]
            if piece:
                content.append(piece)
        messages.append({"role": role, "content": content})
    if placeholders and placeholders != len(images):
        raise BadSample("image_mismatch", where, f"{placeholders} <image> placeholders for {len(images)} images")
    return messages, placeholders


__all__ = [
    "FORMATS", "REASONS", "BadSample", "Conversation", "Document", "ImageSource", "LlavaRecord", "Pair",
    "TarSample", "count_tar_samples", "iter_tar_groups", "iter_tar_samples", "load_llava", "map_image_path",
    "parse_conversation", "parse_document", "parse_pair", "split_member_name",
]
