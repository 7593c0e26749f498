"""Parquet and Arrow shards as mixture sources: Hugging Face datasets' files, read with pyarrow alone.

A source whose paths all end in ``.parquet`` or ``.arrow`` reads its rows straight from those
files, one row group (an Arrow file's record batch) at a time, only the columns it uses; it is
streamed, shuffled, dealt to ranks and resumed exactly as tar shards are
(:class:`~interleaf.data.stream.MixtureStream`). The source's ``format`` says what a row is; the
file's columns say how it is laid out (:data:`LAYOUTS`, detected from each file's schema)::

    format       columns                                            as the hub ships them
    llava        messages [{role, content: str | [{type, text}]}],  HuggingFaceH4/llava-instruct-mix-vsft
                 images [image] (optional)                          (TRL's SFT data)
    llava        texts [{user, assistant}], images [image]          HuggingFaceM4/the_cauldron
    interleaved  texts [str | null], images [image | null]          HuggingFaceM4/OBELICS (aligned lists)
    preference   question, chosen, rejected, image                  openbmb/RLAIF-V-Dataset
    preference   prompt, chosen, rejected, images                   HuggingFaceH4/rlaif-v_formatted (TRL's DPO data)
    pairs        image, caption (or text)                           image-text pairs

An image is the ``datasets`` Image feature as Arrow stores it, a struct ``{bytes, path}`` (the
bytes win; a path alone names a local file), or a string: a local path, or a data URL. Relative
paths are read from the source's ``images_root`` (default: the parquet file's folder), after
``image_path_map``. An ``id`` column, when there is one, names the sample.

Images at http(s) URLs (OBELICS ships only those) are never fetched while training: such a row is
a bad sample (``remote_image``). ``interleaf data convert FILE OUT --download-images`` is the one
explicit download step; it writes the rows, their images fetched, as WebDataset shards to train on.

Rows follow every rule of their interleaf format (``<image>`` placeholders, an image part standing
for one; with none, the images before the first user text), and a row that breaks one is skipped
and counted like any bad sample. A file that cannot be opened or read is one bad sample in place
of its remaining rows; a file whose columns fit no layout is an :class:`~interleaf.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .formats import (
    CAPTION_KEYS,
    TABLE_EXTENSIONS,
    BadSample,
    Document,
    ImageSource,
    LlavaRecord,
    Pair,
    count_tar_samples,
    iter_tar_groups,
    map_image_path,
    parse_conversation,
)
from .preference import _turns, parse_preference

# layout -> (the format its rows are, the columns it reads, the columns it needs)
LAYOUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "rlaif": ("preference", ("id", "question", "chosen", "rejected", "image"), ("question", "chosen", "rejected")),
    "trl_preference": ("preference", ("id", "prompt", "chosen", "rejected", "images"), ("prompt", "chosen", "rejected")),
    "messages": ("llava", ("id", "messages", "images"), ("messages",)),
    "cauldron": ("llava", ("id", "texts", "images"), ("texts", "images")),
    "obelics": ("interleaved", ("id", "texts", "images"), ("texts", "images")),
    "pairs": ("pairs", ("id", "image", *CAPTION_KEYS), ("image",)),
}


def is_table_file(path: str | Path) -> bool:
    return str(path).endswith(TABLE_EXTENSIONS)


def _layout(schema, path: str) -> str:
    """The layout of a file with ``schema`` (an Arrow schema), or an :class:`InputError`."""
    import pyarrow as pa

    names = set(schema.names)
    if {"chosen", "rejected"} <= names:
        found = "rlaif" if "question" in names else "trl_preference" if "prompt" in names else None
    elif "messages" in names:
        found = "messages"
    elif {"texts", "images"} <= names:
        texts = schema.field("texts").type
        nested = pa.types.is_list(texts) or pa.types.is_large_list(texts)
        found = "cauldron" if nested and pa.types.is_struct(texts.value_type) else "obelics"
    elif "image" in names and names & set(CAPTION_KEYS):
        found = "pairs"
    else:
        found = None
    if found is None:
        raise InputError(
            f"{path}: its columns {sorted(names)} fit none of interleaf's parquet layouts: messages + images "
            "(llava-instruct-mix-vsft), texts [{user, assistant}] + images (the_cauldron), texts + images "
            "(OBELICS), question/chosen/rejected/image (RLAIF-V), prompt/chosen/rejected/images (TRL), "
            "image + caption; rename the columns, or convert the file (see interleaf.data.tables)"
        )
    return found


def table_format(path: str | Path) -> str:
    """The interleaf format of a parquet / Arrow file's rows, from its columns."""
    return LAYOUTS[_TableFile(Path(path)).layout][0]


@dataclass
class TableRow:
    """One row of a parquet / Arrow file: its used columns as Python values."""

    data: dict[str, Any]
    layout: str
    where: str  # "path[i]": the file and the row's index in it
    key: str
    folder: Path  # the file's folder (relative image paths, when the source has no images_root)


class _TableFile:
    """A parquet or Arrow (file or stream format) file: its row groups and their rows.

    Opening raises :class:`BadSample` (``missing_file`` or ``corrupt_shard``); a file whose columns
    fit no layout raises :class:`InputError`.
    """

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        if not path.is_file():
            raise BadSample("missing_file", str(path), "the file does not exist")
        self._batches = self._parquet = None
        try:
            if path.suffix == ".parquet":
                self._parquet = pq.ParquetFile(path)
                schema = self._parquet.schema_arrow
                meta = self._parquet.metadata
                self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:
                schema, self._batches = self._arrow_batches(pa, path)
                self.group_rows = [b.num_rows for b in self._batches]
        except (pa.ArrowException, OSError) as e:
            raise BadSample("corrupt_shard", str(path), f"not a readable {path.suffix[1:]} file ({e})") from e
        self.layout = _layout(schema, str(path))
        self.columns = [c for c in LAYOUTS[self.layout][1] if c in schema.names]

    @staticmethod
    def _arrow_batches(pa, path: Path) -> tuple[Any, list]:
        """The schema and record batches of an Arrow IPC file (random access) or stream (``datasets``'
        save_to_disk), memory-mapped: a batch's bytes are read when its rows are."""
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            return reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except pa.ArrowInvalid:
            source.seek(0)
            stream = pa.ipc.open_stream(source)
            return stream.schema, list(stream)

    def read(self, group: int) -> list[dict]:
        """The rows of one row group (the used columns only)."""
        if self._parquet is not None:
            return self._parquet.read_row_group(group, columns=self.columns).to_pylist()
        return self._batches[group].select(self.columns).to_pylist()


def iter_table_rows(
    path: str | Path, *, select: Callable[[int], bool] | None = None
) -> Iterator[TableRow | BadSample | None]:
    """Yield the rows of one file in order, as :func:`~interleaf.data.formats.iter_tar_groups`
    yields a shard's samples: ``select(i)`` says whether to read row ``i``; a row group none of whose
    rows is selected is never read (its rows are yielded as ``None``). A missing or unreadable file
    yields one :class:`BadSample` and stops."""
    import pyarrow as pa

    path = Path(path)
    try:
        table = _TableFile(path)
    except BadSample as bad:
        yield bad
        return
    start = 0
    for group, n in enumerate(table.group_rows):
        wanted = [select is None or select(i) for i in range(start, start + n)]
        rows: list[dict] = []
        if any(wanted):
            try:
                rows = table.read(group)
            except (pa.ArrowException, OSError) as e:
                yield BadSample("corrupt_shard", str(path), f"row group {group} cannot be read ({e})")
                return
        for j in range(n):
            if not wanted[j]:
                yield None
                continue
            data, i = rows[j], start + j
            key = str(data["id"]) if data.get("id") is not None else f"{path.stem}-{i}"
            yield TableRow(data, table.layout, f"{path}[{i}]", key, path.parent)
        start += n


def count_table_rows(path: str | Path) -> int:
    """The rows of a file (from its metadata); 0 if it cannot be read."""
    try:
        return sum(_TableFile(Path(path)).group_rows)
    except BadSample:
        return 0


def iter_samples(path: str | Path, *, select: Callable[[int], bool] | None = None):
    """A shard's raw samples: a parquet / Arrow file's rows, or a tar shard's samples."""
    return iter_table_rows(path, select=select) if is_table_file(path) else iter_tar_groups(path, select=select)


def count_samples(path: str | Path) -> int:
    return count_table_rows(path) if is_table_file(path) else count_tar_samples(path)


# --------------------------------------------------------------------------- rows -> samples


def table_image(value: Any, where: str, root: Path, path_map: dict[str, str] | None = None) -> ImageSource:
    """An image cell (``{bytes, path}``, bytes, or a path / data URL string) -> an :class:`ImageSource`."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageSource(bytes(value["bytes"]), where)
        value = value.get("path")
        if not value:
            raise BadSample("malformed_json", where, "an image struct with neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return ImageSource(bytes(value), where)
    if not isinstance(value, str):
        raise BadSample("malformed_json", where, f"an image is {{bytes, path}} or a string, got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise BadSample(
            "remote_image", where,
            f"{value[:60]!r} is a URL; interleaf never downloads while training: fetch the images once with "
            "`interleaf data convert FILE OUT --download-images` and train on OUT",
        )
    if value.startswith("data:"):
        return ImageSource(value, where)
    try:
        path = Path(map_image_path(value, path_map or {})).expanduser()
        path = path if path.is_absolute() else root / path
        usable = path.is_file()
    except (OSError, ValueError, RuntimeError) as e:
        raise BadSample("missing_file", where, f"image path {value[:80]!r} is not usable ({e})") from e
    if not usable:
        raise BadSample("missing_file", where, f"image file {str(path)!r} does not exist")
    return ImageSource(path, where)


def _images(value: Any, where: str, root: Path, path_map: dict[str, str]) -> list[ImageSource]:
    values = [] if value is None else [value] if not isinstance(value, list) else value
    return [table_image(v, f"{where} image {i}", root, path_map) for i, v in enumerate(values)]


def _cauldron_turns(texts: Any, where: str) -> list[dict]:
    if not isinstance(texts, list) or not texts:
        raise BadSample("malformed_json", where, "'texts' must be a non-empty list of {user, assistant}")
    turns = []
    for t in texts:
        if not isinstance(t, dict):
            raise BadSample("malformed_json", where, f"a 'texts' entry is {{user, assistant}}, got {str(t)[:60]}")
        turns += [{"from": "human", "value": t.get("user")}, {"from": "gpt", "value": t.get("assistant")}]
    return turns


def _document(row: TableRow, root: Path, path_map: dict[str, str]) -> Document:
    """An OBELICS row -> a :class:`Document` (the rules of :func:`~interleaf.data.formats.parse_document`)."""
    texts, images = row.data.get("texts"), row.data.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadSample("malformed_json", row.where, "'texts' and 'images' must be two lists of equal length")
    items: list[str | ImageSource] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if image is not None:
            items.append(table_image(image, f"{row.where} item {i}", root, path_map))
        elif isinstance(text, str) and text.strip():
            items.append(text.strip())
    if not any(isinstance(i, str) for i in items):
        raise BadSample("empty_text", row.where, "the document has no text")
    return Document(items, row.key)


def _pair(row: TableRow, root: Path, path_map: dict[str, str]) -> Pair:
    caption = next((row.data[k] for k in CAPTION_KEYS if isinstance(row.data.get(k), str)), None)
    if caption is None or not caption.strip():
        raise BadSample("empty_text", row.where, f"no caption (a {'/'.join(CAPTION_KEYS)} column)")
    if row.data.get("image") is None:
        raise BadSample("missing_file", row.where, "the row has no image")
    return Pair(table_image(row.data["image"], f"{row.where} image", root, path_map), caption.strip(), row.key)


def parse_row(row: TableRow, cfg) -> Any:
    """A row -> the parsed sample of its format (:class:`~interleaf.data.formats.Conversation`,
    :class:`~interleaf.data.formats.Document`, :class:`~interleaf.data.formats.Pair` or
    :class:`~interleaf.data.preference.Preference`), or :class:`BadSample`. ``cfg`` is the
    row's source (:class:`~interleaf.data.mixture.SourceConfig`): its format, images_root,
    image_path_map and task_prompt."""
    fmt = LAYOUTS[row.layout][0]
    if fmt != cfg.format:
        raise InputError(
            f"source {cfg.name!r} has format {cfg.format!r}, but {row.where.rsplit('[', 1)[0]} holds {fmt} rows "
            f"({row.layout} columns); set format: {fmt} on the source, or give it other files"
        )
    root = Path(cfg.images_root) if cfg.images_root else row.folder
    path_map, data, where = cfg.image_path_map, row.data, row.where
    if row.layout == "obelics":
        return _document(row, root, path_map)
    if row.layout == "pairs":
        return _pair(row, root, path_map)
    if fmt == "preference":
        images = _images(data.get("image", data.get("images")), where, root, path_map)
        entry = {"id": row.key, "prompt": data.get("question", data.get("prompt")), "image": images,
                 "chosen": data["chosen"], "rejected": data["rejected"]}
        return parse_preference(LlavaRecord(entry, where), task_prompt=cfg.task_prompt)
    if row.layout == "messages":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadSample("malformed_json", where, "'messages' must be a non-empty list of {role, content}")
        turns = _turns(messages, where)
    else:
        turns = _cauldron_turns(data.get("texts"), where)
    images = _images(data.get("images"), where, root, path_map)
    return parse_conversation(LlavaRecord({"id": row.key, "conversations": turns, "image": images}, where),
                              task_prompt=cfg.task_prompt)


__all__ = [
    "LAYOUTS", "TABLE_EXTENSIONS", "TableRow", "count_samples", "count_table_rows", "is_table_file",
    "iter_samples", "iter_table_rows", "parse_row", "table_format", "table_image",
]