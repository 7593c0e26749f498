"""``interleaf data convert``: Hugging Face parquet / Arrow files to interleaf's on-disk formats and back.

::

    parquet / Arrow rows (interleaf.data.tables)           interleaf's files (interleaf.data.formats)
      llava rows (messages, or the_cauldron's texts)  ──►  llava.jsonl + images/        (format: llava)
      preference rows (RLAIF-V, TRL)                  ──►  preference.jsonl + images/   (format: preference)
      OBELICS documents                               ──►  interleaved-000000.tar ...   (format: interleaved)
      image-caption pairs                             ──►  pairs-000000.tar ...         (format: pairs)
    and back, every interleaf format ──► train-00000.parquet ... in the hub's layouts:
      llava ─► messages + images (llava-instruct-mix-vsft); interleaved ─► texts + images (OBELICS);
      preference ─► prompt / chosen / rejected / images (TRL, rlaif-v_formatted); pairs ─► image + caption

Images are written as the ``datasets`` Image feature (``{bytes, path}``), and each parquet file
carries the ``datasets`` features in its schema metadata, so ``datasets.load_dataset("parquet", ...)``
reads its image columns as images. Every sample goes through the same reader as training: a bad one
is skipped and counted, never written, and an image that does not decode is a bad sample.

URL images (OBELICS) are fetched only with ``download_images=True`` (``--download-images``), the one
step of interleaf that downloads training data; a failed download is a bad sample.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..processing.images import load_image
from .formats import BadSample, Conversation, Document, ImageSource, Pair
from .mixture import SourceConfig
from .preference import Preference
from .stream import BadSampleCounter, _LlavaStream, _source_stream
from .tables import TableRow, is_table_file, iter_samples

PIL_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass
class ConversionReport:
    """What a conversion wrote: its files with their sample counts, and the bad samples it skipped."""

    files: dict[str, int] = field(default_factory=dict)
    bad: BadSampleCounter = field(default_factory=lambda: BadSampleCounter(max_bad_fraction=1.0))

    @property
    def written(self) -> int:
        return sum(self.files.values())


def download_image(url: str, where: str) -> bytes:
    """The image at ``url`` as PNG bytes (decoded and checked); the one place conversion uses the network."""
    img = load_image(url, where=where, allow_urls=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _download(row: TableRow) -> None:
    """Replace every URL image of ``row`` by the fetched bytes (a failure is a bad sample)."""
    for column in ("images", "image"):
        value = row.data.get(column)
        cells = value if isinstance(value, list) else [value]
        for i, cell in enumerate(cells):
            url = cell.get("path") if isinstance(cell, dict) and not cell.get("bytes") else cell
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                where = f"{row.where} image {i}"
                try:
                    cells[i] = {"bytes": download_image(url, where), "path": url}
                except InputError as e:
                    raise BadSample("remote_image", where, f"the download failed: {e}") from e
        if column in row.data and not isinstance(value, list):
            row.data[column] = cells[0]


def iter_parsed(cfg: SourceConfig, *, download_images: bool = False) -> Iterator[Any]:
    """A source's samples in file order, parsed (not tokenised): each a parsed sample or a :class:`BadSample`."""
    stream = _source_stream(cfg, 0, 0, 1, 1)
    raws = iter(stream.records) if isinstance(stream, _LlavaStream) else (
        item for f in stream.files for item in iter_samples(f))
    for raw in raws:
        try:
            if download_images and isinstance(raw, TableRow):
                _download(raw)
            yield stream.parse(raw)
        except BadSample as bad:
            yield bad


def image_file(source: ImageSource) -> tuple[bytes, str]:
    """An image's bytes and extension, checked by decoding it (other formats than PNG, JPEG and WebP
    are written as PNG)."""
    value = source.value
    try:
        if isinstance(value, Path):
            data = value.read_bytes()
        elif isinstance(value, str):  # a data URL
            data = base64.b64decode(value.split(",", 1)[1]) if "," in value else b""
        else:
            data = bytes(value)
        img = load_image(data, where=source.where)
    except (InputError, OSError, ValueError) as e:
        raise BadSample("unreadable_image", source.where, str(e)) from e
    from PIL import Image

    fmt = Image.open(io.BytesIO(data)).format
    if fmt in PIL_EXTENSIONS:
        return data, PIL_EXTENSIONS[fmt]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _safe(key: str) -> str:
    """A sample key usable in a file name and as a WebDataset key (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)[:80] or "sample"


def _llava_value(content: list, images: list[str], name: str) -> str:
    """A message's content as LLaVA text, each image an ``<image>`` on its own line."""
    out: list[str] = []
    for part in content:
        if isinstance(part, ImageSource):
            images.append(name.format(len(images)))
            out.append("<image>")
        else:
            out.append(part)
    return "\n".join(out)


def _write_tar_sample(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
    for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


class _Shards:
    """Tar shards of at most ``per_file`` samples: ``{prefix}-000000.tar``, ..."""

    def __init__(self, out: Path, prefix: str, per_file: int, report: ConversionReport):
        self.out, self.prefix, self.per_file, self.report = out, prefix, per_file, report
        self.tar: tarfile.TarFile | None = None
        self.name, self.count = "", 0

    def add(self, members: dict[str, bytes]) -> None:
        if self.tar is None or self.report.files[self.name] >= self.per_file:
            self.close()
            self.name = f"{self.prefix}-{self.count:06d}.tar"
            self.tar, self.count = tarfile.open(self.out / self.name, "w"), self.count + 1
            self.report.files[self.name] = 0
        _write_tar_sample(self.tar, members)
        self.report.files[self.name] += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def to_interleaf(cfg: SourceConfig, out: Path, *, per_file: int = 10_000, download_images: bool = False
                 ) -> ConversionReport:
    """A parquet / Arrow source -> interleaf's files in ``out`` (see the module docstring)."""
    report = ConversionReport()
    shards = _Shards(out, cfg.format, per_file, report)
    jsonl = None
    if cfg.format in ("llava", "preference"):
        (out / "images").mkdir(parents=True, exist_ok=True)
        name = f"{cfg.format}.jsonl"
        jsonl, report.files[name] = (out / name).open("w", encoding="utf-8"), 0
    try:
        for n, parsed in enumerate(iter_parsed(cfg, download_images=download_images)):
            if isinstance(parsed, BadSample):
                report.bad.add_bad(cfg.name, parsed)
                continue
            try:
                key = f"{n:08d}-{_safe(parsed.key)}"
                if jsonl is not None:
                    entry = _json_entry(parsed, key, out)
                    jsonl.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    report.files[f"{cfg.format}.jsonl"] += 1
                else:
                    shards.add(_tar_members(parsed, key))
            except BadSample as bad:
                report.bad.add_bad(cfg.name, bad)
                continue
            report.bad.add_good(cfg.name)
    finally:
        shards.close()
        if jsonl is not None:
            jsonl.close()
    return report


def _json_entry(parsed: Conversation | Preference, key: str, out: Path) -> dict:
    """A LLaVA or preference JSON entry; its images are written to ``out/images/``."""
    messages = parsed.messages if isinstance(parsed, Conversation) else parsed.prompt
    files = [image_file(src) for src in parsed.images]  # every image checked before anything is written
    names: list[str] = []
    turns = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
              "value": _llava_value(m["content"], names, f"images/{key}-{{}}")} for m in messages]
    names = [f"{name}.{ext}" for name, (_, ext) in zip(names, files)]
    for name, (data, _) in zip(names, files):
        (out / name).write_bytes(data)
    entry: dict[str, Any] = {"id": parsed.key}
    if names:
        entry["image"] = names
    if isinstance(parsed, Conversation):
        return {**entry, "conversations": turns}
    return {**entry, "prompt": turns, "chosen": parsed.chosen, "rejected": parsed.rejected}


def _tar_members(parsed: Document | Pair, key: str) -> dict[str, bytes]:
    """A document's or a pair's tar members (images as ``{key}.{i}.{ext}`` / ``{key}.{ext}``)."""
    if isinstance(parsed, Pair):
        data, ext = image_file(parsed.image)
        return {f"{key}.{ext}": data, f"{key}.txt": parsed.caption.encode("utf-8")}
    texts, images, members = [], [], {}
    for item in parsed.items:
        if isinstance(item, ImageSource):
            data, ext = image_file(item)
            name = f"{key}.{len(members)}.{ext}"
            members[name] = data
            texts.append(None)
            images.append(name)
        else:
            texts.append(item)
            images.append(None)
    doc = json.dumps({"texts": texts, "images": images}, ensure_ascii=False).encode("utf-8")
    return {f"{key}.json": doc, **members}


# --------------------------------------------------------------------------- interleaf -> parquet


def _schemas() -> dict[str, Any]:
    """The Arrow schema of each format's parquet layout (the column types ``datasets`` gives the hub's files)."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    part = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))
    return {
        "llava": pa.schema([("id", pa.string()), ("messages", messages), ("images", pa.list_(image))]),
        "interleaved": pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(image))]),
        "preference": pa.schema([("id", pa.string()), ("prompt", messages), ("chosen", messages),
                                 ("rejected", messages), ("images", pa.list_(image))]),
        "pairs": pa.schema([("id", pa.string()), ("image", image), ("caption", pa.string())]),
    }


def _features(arrow_type, image: bool = False) -> dict:
    """``datasets``' feature JSON for an Arrow type of :func:`_schemas` (``image``: the column holds images)."""
    import pyarrow as pa

    if image and pa.types.is_struct(arrow_type):
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type):
        return {"feature": _features(arrow_type.value_type, image), "_type": "List"}
    if pa.types.is_struct(arrow_type):
        return {f.name: _features(f.type) for f in arrow_type}
    return {"dtype": str(arrow_type).replace("large_", ""), "_type": "Value"}


def _with_features(schema):
    info = {"info": {"features": {f.name: _features(f.type, f.name in ("image", "images")) for f in schema}}}
    return schema.with_metadata({b"huggingface": json.dumps(info).encode("utf-8")})


def _image_cell(source: ImageSource, name: str) -> dict:
    data, ext = image_file(source)
    return {"bytes": data, "path": f"{name}.{ext}"}


def _message(message: dict, images: list[dict], key: str) -> dict:
    """A chat message as the hub writes it: typed parts, an image part's index into the row's ``images``."""
    parts = []
    for part in message["content"]:
        if isinstance(part, ImageSource):
            parts.append({"index": len(images), "text": None, "type": "image"})
            images.append(_image_cell(part, f"{key}-{len(images)}"))
        else:
            parts.append({"index": None, "text": part, "type": "text"})
    return {"role": message["role"], "content": parts}


def parquet_row(parsed: Any, key: str) -> dict:
    """A parsed sample -> its row in the parquet layout of its format (:func:`_schemas`)."""
    if isinstance(parsed, Pair):
        return {"id": parsed.key, "image": _image_cell(parsed.image, key), "caption": parsed.caption}
    images: list[dict] = []
    if isinstance(parsed, Document):
        texts = [None if isinstance(i, ImageSource) else i for i in parsed.items]
        cells = [_image_cell(i, f"{key}-{n}") if isinstance(i, ImageSource) else None
                 for n, i in enumerate(parsed.items)]
        return {"id": parsed.key, "texts": texts, "images": cells}
    if isinstance(parsed, Conversation):
        messages = [_message(m, images, key) for m in parsed.messages]
        return {"id": parsed.key, "messages": messages, "images": images}
    prompt = [_message(m, images, key) for m in parsed.prompt]
    answer = {a: [{"role": "assistant", "content": [{"index": None, "text": getattr(parsed, a), "type": "text"}]}]
              for a in ("chosen", "rejected")}
    return {"id": parsed.key, "prompt": prompt, **answer, "images": images}


def to_parquet(cfg: SourceConfig, out: Path, *, per_file: int = 10_000, row_group_size: int = 100) -> ConversionReport:
    """An interleaf source (tar shards, LLaVA or preference JSON) -> ``out/train-00000.parquet`` ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    report = ConversionReport()
    schema = _with_features(_schemas()[cfg.format])
    rows: list[dict] = []

    def flush() -> None:
        name = f"train-{len(report.files):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / name, row_group_size=row_group_size)
        report.files[name] = len(rows)
        rows.clear()

    for n, parsed in enumerate(iter_parsed(cfg)):
        try:
            if isinstance(parsed, BadSample):
                raise parsed
            rows.append(parquet_row(parsed, f"{n:08d}-{_safe(parsed.key)}"))
        except BadSample as bad:
            report.bad.add_bad(cfg.name, bad)
            continue
        report.bad.add_good(cfg.name)
        if len(rows) >= per_file:
            flush()
    if rows or not report.files:
        flush()
    return report


def convert(
    cfg: SourceConfig, out: str | Path, *, per_file: int = 10_000, row_group_size: int = 100,
    download_images: bool = False,
) -> ConversionReport:
    """Convert one source: parquet / Arrow files to interleaf's files, any other source to parquet.

    ``out`` must be a new or empty folder. ``download_images`` (parquet sources only) fetches URL
    images; without it a row with one is a bad sample (``remote_image``).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"OUT {str(out)!r} is not an empty folder; give a new folder to write the converted files to")
    tables = is_table_source(cfg.files())
    if download_images and not tables:
        raise InputError("--download-images applies to parquet / Arrow sources (interleaf's own files hold their images)")
    out.mkdir(parents=True, exist_ok=True)
    if tables:
        return to_interleaf(cfg, out, per_file=per_file, download_images=download_images)
    return to_parquet(cfg, out, per_file=per_file, row_group_size=row_group_size)


def is_table_source(files: list[str]) -> bool:
    return bool(files) and all(is_table_file(f) for f in files)


__all__ = [
    "ConversionReport", "convert", "download_image", "image_file", "is_table_source", "iter_parsed", "parquet_row",
    "to_interleaf", "to_parquet",
]
