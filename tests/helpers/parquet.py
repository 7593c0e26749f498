"""Tiny parquet files in the layouts of the hub's datasets (llava-instruct-mix-vsft, the_cauldron,
OBELICS, RLAIF-V), written with pyarrow and the column types ``datasets`` gives them; each file
holds good rows and a known number of bad ones."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Arrow
PART = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(PART))]))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def png(colour: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def image(colour: str) -> dict:
    return {"bytes": png(colour), "path": f"{colour}.png"}


def write(path: Path, rows: list[dict], schema: pa.Schema, row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def _user(text: str, images: int = 1) -> dict:
    parts = [{"index": i, "text": None, "type": "image"} for i in range(images)]
    return {"role": "user", "content": parts + [{"index": None, "text": text, "type": "text"}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"index": None, "text": text, "type": "text"}]}


def vsft(path: Path, n: int = 6) -> tuple[Path, dict[str, int]]:
    """llava-instruct-mix-vsft rows: ``messages`` (typed parts) + ``images``; the last row has two
    image parts for one image (a bad row)."""
    names = list(COLOURS)
    rows = [{"messages": [_user("What colour is it?"), _assistant(names[i % 4])], "images": [image(names[i % 4])]}
            for i in range(n)]
    rows.append({"messages": [_user("Which is red?", images=2), _assistant("the first")], "images": [image("red")]})
    schema = pa.schema([("messages", MESSAGES), ("images", pa.list_(IMAGE))])
    return write(path, rows, schema), {"image_mismatch": 1}


def cauldron(path: Path, n: int = 6) -> tuple[Path, dict[str, int]]:
    """the_cauldron rows: ``texts`` [{user, assistant, source}] + ``images``; the last row's image
    bytes do not decode (a bad row)."""
    names = list(COLOURS)
    texts = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))
    rows = [{"images": [image(names[i % 4])],
             "texts": [{"user": "Colour?", "assistant": names[i % 4], "source": "synth"},
                       {"user": "Is it square?", "assistant": "yes", "source": "synth"}]} for i in range(n)]
    rows.append({"images": [{"bytes": b"not a png", "path": None}],
                 "texts": [{"user": "Colour?", "assistant": "red", "source": "synth"}]})
    return write(path, rows, pa.schema([("images", pa.list_(IMAGE)), ("texts", texts)])), {"unreadable_image": 1}


def obelics(path: Path, n: int = 6) -> tuple[Path, dict[str, int]]:
    """OBELICS rows: aligned ``texts`` / ``images``, images as bytes or as local files next to the
    parquet file (``images/<colour>.png``); the last row's image is a URL (a bad row)."""
    names = list(COLOURS)
    folder = path.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for c in names:
        (folder / f"{c}.png").write_bytes(png(c))
    rows = []
    for i in range(n):
        first = image(names[i % 4]) if i % 2 else {"bytes": None, "path": f"images/{names[i % 4]}.png"}
        rows.append({"texts": ["A picture.", None, f"It is {names[i % 4]}.", None, "The end."],
                     "images": [None, first, None, image(names[(i + 1) % 4]), None],
                     "metadata": "[]", "general_metadata": "{}"})
    rows.append({"texts": ["A picture.", None, "It is red."], "images": [None, {"bytes": None, "path":
                 "https://example.com/red.png"}, None], "metadata": "[]", "general_metadata": "{}"})
    schema = pa.schema([("images", pa.list_(IMAGE)), ("metadata", pa.string()), ("general_metadata", pa.string()),
                        ("texts", pa.list_(pa.string()))])
    return write(path, rows, schema), {"remote_image": 1}


def rlaif(path: Path, n: int = 8) -> tuple[Path, dict[str, int]]:
    """RLAIF-V rows: ``question`` / ``chosen`` / ``rejected`` / ``image``; chosen names the image's
    colour, rejected the next one; the last row's chosen answer is empty (a bad row)."""
    names = list(COLOURS)
    rows = [{"ds_name": "synth", "image": image(names[i % 4]), "question": "What colour is the image?",
             "chosen": names[i % 4], "rejected": names[(i + 1) % 4], "origin_dataset": "synth"} for i in range(n)]
    rows.append({"ds_name": "synth", "image": image("red"), "question": "What colour?", "chosen": " ",
                 "rejected": "blue", "origin_dataset": "synth"})
    schema = pa.schema([("ds_name", pa.string()), ("image", IMAGE), ("question", pa.string()),
                        ("chosen", pa.string()), ("rejected", pa.string()), ("origin_dataset", pa.string())])
    return write(path, rows, schema), {"empty_text": 1}


WRITERS = {"vsft": ("llava", vsft), "cauldron": ("llava", cauldron), "obelics": ("interleaved", obelics),
           "rlaif": ("preference", rlaif)}
