"""A synthetic corpus of rendered shape scenes, written in the on-disk formats of real datasets.

The demo trains a tiny vision-language model from scratch, so the corpus is built to be
learnable in minutes and unambiguous by construction:

- A scene holds 1-3 objects (``max_objects``, at most 4), each in its own cell of a 2x2 grid
  (cells numbered row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), each with
  a distinct shape (circle, square, triangle, cross) and a distinct colour (red, green, blue,
  yellow, white) on a black background. "the circle" and "the red object" always name exactly
  one object, and "left/right", "top/bottom" follow from the cell alone.
- Rendering is a pure function of the scene: no jitter, no anti-aliasing, so the same scene
  always gives the same pixels (and the same PNG bytes).
- Five question types, each with one-word answers: ``colour`` ("what colour is the circle?"),
  ``shape`` ("what shape is the red object?"), ``count`` ("how many objects are there?" ->
  "two"), ``position`` ("is the circle on the left or the right?" / "is the circle at the top
  or the bottom?") and ``yesno`` ("is there a blue triangle?", balanced yes/no per split).

Scene identity is the set of ``(shape, colour, cell, size)`` tuples. :func:`write_corpus`
enumerates every identity, reserves a fixed fraction of each object count for the held-out
split, and samples training scenes only from the rest, so no held-out scene is ever seen in
training.

On-disk layout written by :func:`write_corpus` (paths relative to ``out_dir``)::

    corpus.json                       manifest: files, counts, seed, image size, answer vocab
    scenes.json                       image path (relative to images/) -> its scene's objects
    images/train/s0123abcd4567.png    one PNG per distinct scene, named by :func:`scene_key`
    images/heldout/s89ef01234567.png    (LLaVA "image" paths are relative to images/)
    pairs/train-000000.tar            WebDataset image-text pairs, as LAION / COYO ship:
                                        {key}.png, {key}.txt (caption), {key}.json (the scene)
    interleaved/train-000000.tar      OBELICS-style documents, one tar sample per document:
                                        {key}.json = {"texts": [...], "images": [...]}
                                        {key}.0.png, {key}.1.png, ... the document's images
    llava/vqa_train.json              single-turn VQA, LLaVA format, one "qtype" per entry
    llava/vqa_train_colour.json       the same entries split by question type (``_shape``,
                                        ``_count``, ``_position``, ``_yesno`` likewise)
    llava/vqa_heldout.json            the same for held-out scenes (evaluation)
    llava/conv_train.json             multi-turn conversations (2-3 turns) for instruction tuning
    llava/captions_heldout.json       held-out image id -> list of reference captions (CIDEr);
                                        the image of id ``s0123abcd4567`` is
                                        ``images/heldout/s0123abcd4567.png``

Interleaved documents follow OBELICS's convention: ``texts`` and ``images`` are aligned lists of
equal length and at each position exactly one of the two is non-null. An image entry is the
*full member name* of that image inside the same tar sample, e.g. ``"doc-000012.0.png"``;
WebDataset groups it with ``doc-000012.json`` under the key ``doc-000012`` and exposes it as the
field ``"0.png"`` (the member name minus ``"{key}."``). Documents read image, caption, image,
caption, ... in reading order.

Everything is deterministic for a seed: the same arguments give byte-identical files (tar
members carry mtime 0, uid/gid 0 and empty owner names; JSON is written with fixed key order).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import shutil
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import InputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 20),
    "white": (245, 245, 245),
}
SIZES: dict[str, float] = {"large": 0.40, "small": 0.22}  # radius as a fraction of a cell side
MIN_SIZE_FOR_SMALL = 48  # below this, small shapes are too few pixels to tell apart
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
GRID = 2  # the image is a GRID x GRID grid of cells; one object per cell at most
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QTYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "yesno")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
NONSENSE_WORDS: tuple[str, ...] = (
    "dax", "blicket", "wug", "zorp", "fep", "toma", "kiki", "gazzer",
    "modi", "tupa", "lorp", "mib", "zav", "pilk", "rell", "snib",
)
CAPTION_PROMPT = "describe the image."

_TAR_FORMAT = tarfile.USTAR_FORMAT
_CORPUS_DIRS = ("images", "pairs", "interleaved", "llava")


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""

    shape: str
    colour: str
    size: str
    cell: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class Scene:
    """A set of objects with distinct cells, shapes and colours, kept in cell (reading) order."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: o.cell))
        object.__setattr__(self, "objects", objs)
        if not objs:
            raise InputError("Scene: a scene needs at least one object")
        for field in ("cell", "shape", "colour"):
            values = [getattr(o, field) for o in objs]
            if len(set(values)) != len(values):
                raise InputError(
                    f"Scene: two objects share a {field} ({values}); every object needs its own "
                    f"{field} so that questions about it have one answer"
                )
        for o in objs:
            if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES:
                raise InputError(
                    f"Scene: unknown object {o}; shapes are {list(SHAPES)}, colours "
                    f"{list(COLOURS)}, sizes {list(SIZES)}"
                )
            if not 0 <= o.cell < GRID * GRID:
                raise InputError(f"Scene: cell {o.cell} is outside the {GRID}x{GRID} grid (0-3)")

    @property
    def identity(self) -> tuple[tuple[str, str, int, str], ...]:
        """The scene's identity: its ``(shape, colour, cell, size)`` tuples in cell order."""
        return tuple((o.shape, o.colour, o.cell, o.size) for o in self.objects)

    def to_dict(self) -> dict:
        objs = [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "cell": o.cell}
            for o in self.objects
        ]
        return {"objects": objs}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(tuple(SceneObject(**o) for o in data["objects"]))


def _check_vocab(
    max_objects: int, shapes: Sequence[str], colours: Sequence[str], sizes: Sequence[str]
) -> None:
    if not 1 <= max_objects <= min(GRID * GRID, len(shapes), len(colours)):
        raise InputError(
            f"max_objects={max_objects}: must be between 1 and "
            f"{min(GRID * GRID, len(shapes), len(colours))} (one object per grid cell, each with "
            "its own shape and colour)"
        )
    checks = (("shapes", shapes, SHAPES), ("colours", colours, COLOURS), ("sizes", sizes, SIZES))
    for name, values, known in checks:
        unknown = [v for v in values if v not in known]
        if unknown or not values or len(set(values)) != len(values):
            raise InputError(f"{name}={list(values)}: must be distinct values from {list(known)}")


def sample_scene(
    rng: random.Random,
    *,
    n_objects: int | None = None,
    max_objects: int = 3,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = ("large",),
) -> Scene:
    """Draw a random scene: ``n_objects`` (default uniform in 1..max_objects) in distinct cells."""
    _check_vocab(max_objects, shapes, colours, sizes)
    k = n_objects if n_objects is not None else rng.randint(1, max_objects)
    if not 1 <= k <= max_objects:
        raise InputError(f"n_objects={k}: must be between 1 and max_objects={max_objects}")
    cells = rng.sample(range(GRID * GRID), k)
    picked_shapes = rng.sample(list(shapes), k)
    picked_colours = rng.sample(list(colours), k)
    objs = [
        SceneObject(shape=s, colour=c, size=rng.choice(list(sizes)), cell=cell)
        for s, c, cell in zip(picked_shapes, picked_colours, cells)
    ]
    return Scene(tuple(objs))


def all_scenes(
    n_objects: int,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    sizes: Sequence[str] = ("large",),
) -> list[Scene]:
    """Every scene with exactly ``n_objects`` objects, in a fixed order."""
    scenes = []
    for cells in itertools.combinations(range(GRID * GRID), n_objects):
        for ss in itertools.permutations(shapes, n_objects):
            for cs in itertools.permutations(colours, n_objects):
                for zs in itertools.product(sizes, repeat=n_objects):
                    objs = itertools.starmap(SceneObject, zip(ss, cs, zs, cells))
                    scenes.append(Scene(tuple(objs)))
    return scenes


def render_scene(scene: Scene, size: int = 32) -> Image.Image:
    """Draw ``scene`` on a black ``size`` x ``size`` RGB image (no anti-aliasing, deterministic)."""
    if size < 16:
        raise InputError(f"render_scene: size={size} is too small to tell shapes apart; use >= 16")
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for o in scene.objects:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = SIZES[o.size] * cell
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = 0.85 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "triangle":
            base = cy + 0.85 * r
            draw.polygon([(cx, cy - r), (cx - r, base), (cx + r, base)], fill=fill)
        elif o.shape == "cross":
            t = 0.36 * r  # half the bar thickness
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of an RGB image: IHDR, one IDAT, IEND; no metadata, so always the same bytes.

    Written directly with zlib because PIL's encoder costs ~10x more per tiny image, which
    dominates writing tens of thousands of 32 px scenes.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    raw, stride = img.tobytes(), 3 * w
    rows = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(h))  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 6))
        + _png_chunk(b"IEND", b"")
    )


def scene_key(scene: Scene) -> str:
    """A short stable name for a scene's identity (used as its image file name)."""
    return "s" + hashlib.sha1(repr(scene.identity).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- text


def _noun_phrase(o: SceneObject) -> str:
    adj = "small " if o.size == "small" else ""
    return f"{adj}{o.colour} {o.shape}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


_CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")


def caption(scene: Scene) -> str:
    """The canonical caption, objects in reading order: ``"a red circle and a blue square."``."""
    return _join([f"a {_noun_phrase(o)}" for o in scene.objects]) + "."


def located_caption(scene: Scene) -> str:
    """The caption with each object's cell: ``"a red circle at the top left and a ..."``."""
    return _join([f"a {_noun_phrase(o)} at the {_CELL_NAMES[o.cell]}" for o in scene.objects]) + "."


def reference_captions(scene: Scene) -> list[str]:
    """Reference captions for CIDEr: the canonical caption first, then two paraphrases."""
    n = len(scene.objects)
    noun = "object" if n == 1 else "objects"
    listed = _join([f"a {_noun_phrase(o)}" for o in scene.objects])
    return [caption(scene), located_caption(scene), f"{NUMBER_WORDS[n]} {noun}: {listed}."]


@dataclass(frozen=True)
class Question:
    """One question about a scene, its one-word answer and its type (one of ``QTYPES``)."""

    question: str
    answer: str
    qtype: str


def make_question(
    scene: Scene,
    qtype: str,
    rng: random.Random,
    *,
    yes: bool | None = None,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> Question:
    """A random question of type ``qtype`` about ``scene``; ``yes`` forces a yes/no answer.

    ``colours`` and ``shapes`` are the vocabulary that "no" questions draw absent pairs from.
    """
    objs = scene.objects
    if qtype == "colour":
        o = rng.choice(objs)
        return Question(f"what colour is the {o.shape}?", o.colour, qtype)
    if qtype == "shape":
        o = rng.choice(objs)
        return Question(f"what shape is the {o.colour} object?", o.shape, qtype)
    if qtype == "count":
        return Question("how many objects are there?", NUMBER_WORDS[len(objs)], qtype)
    if qtype == "position":
        o = rng.choice(objs)
        if rng.random() < 0.5:
            answer = "left" if o.col == 0 else "right"
            return Question(f"is the {o.shape} on the left or the right?", answer, qtype)
        answer = "top" if o.row == 0 else "bottom"
        return Question(f"is the {o.shape} at the top or the bottom?", answer, qtype)
    if qtype == "yesno":
        if yes is None:
            yes = rng.random() < 0.5
        if yes:
            o = rng.choice(objs)
            colour, shape = o.colour, o.shape
        else:
            present = {(o.colour, o.shape) for o in objs}
            absent = [(c, s) for c in colours for s in shapes if (c, s) not in present]
            colour, shape = rng.choice(absent)
        return Question(f"is there a {colour} {shape}?", "yes" if yes else "no", qtype)
    raise InputError(f"make_question: unknown qtype {qtype!r}; known types are {list(QTYPES)}")


def scene_questions(scene: Scene, rng: random.Random, *, yes: bool | None = None) -> list[Question]:
    """One question of every type in ``QTYPES`` about ``scene``."""
    return [make_question(scene, t, rng, yes=yes) for t in QTYPES]


def conversation(
    scene: Scene, image: str, rng: random.Random, *, conv_id: str, n_turns: int | None = None
) -> dict:
    """A LLaVA-format multi-turn entry (2-3 turns by default) about one image.

    Turn types are drawn without repetition from ``QTYPES`` plus ``"caption"``
    (prompt ``CAPTION_PROMPT``, answer the canonical caption). The first human turn starts with
    ``"<image>\\n"``. The entry lists each turn's type under ``"qtypes"``.
    """
    n = n_turns if n_turns is not None else rng.randint(2, 3)
    kinds = rng.sample(list(QTYPES) + ["caption"], n)
    turns: list[dict] = []
    for i, kind in enumerate(kinds):
        if kind == "caption":
            q, a = CAPTION_PROMPT, caption(scene)
        else:
            qa = make_question(scene, kind, rng)
            q, a = qa.question, qa.answer
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        turns.append({"from": "gpt", "value": a})
    return {
        "id": conv_id,
        "image": image,
        "conversations": turns,
        "qtype": "conversation",
        "qtypes": kinds,
    }


def vqa_entry(question: Question, image: str, entry_id: str) -> dict:
    """A single-turn LLaVA-format entry."""
    return {
        "id": entry_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question.question},
            {"from": "gpt", "value": question.answer},
        ],
        "qtype": question.qtype,
    }


def document(key: str, scenes: Sequence[Scene]) -> dict:
    """An OBELICS-style document: image, caption, image, caption, ... with aligned lists.

    Image entries are tar member names ``"{key}.{i}.png"`` of the same sample.
    """
    texts: list[str | None] = []
    images: list[str | None] = []
    for i, scene in enumerate(scenes):
        texts += [None, caption(scene)]
        images += [f"{key}.{i}.png", None]
    return {"texts": texts, "images": images}


def answer_vocabulary(
    max_objects: int = 3, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = tuple(COLOURS)
) -> dict[str, list[str]]:
    """Every answer each question type can have."""
    return {
        "colour": list(colours),
        "shape": list(shapes),
        "count": list(NUMBER_WORDS[1 : max_objects + 1]),
        "position": list(POSITIONS),
        "yesno": ["yes", "no"],
    }


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    """Writes numbered tar shards with fixed member metadata (byte-identical for the same input)."""

    def __init__(self, folder: Path, prefix: str, shard_size: int):
        self.folder, self.prefix, self.shard_size = folder, prefix, shard_size
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def add_sample(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None or self._in_shard >= self.shard_size:
            self.close()
            path = self.folder / f"{self.prefix}-{len(self.paths):06d}.tar"
            self.paths.append(path)
            self._tar = tarfile.open(path, "w", format=_TAR_FORMAT)
            self._in_shard = 0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")


def _split_scenes(
    rng: random.Random,
    n_train: int,
    n_heldout: int,
    heldout_fraction: float,
    max_objects: int,
    sizes: Sequence[str],
) -> tuple[list[Scene], list[Scene]]:
    """Draw training and held-out scenes from disjoint sets of identities.

    For each object count the enumerated identities are shuffled and a ``heldout_fraction`` of
    them (at least one) is reserved. Held-out scenes take an equal share of each count and
    cycle through the reserved identities (distinct until they run out); training scenes draw
    a uniform count, then a uniform identity among the unreserved ones.
    """
    reserved: dict[int, list[Scene]] = {}
    train_pool: dict[int, list[Scene]] = {}
    for k in range(1, max_objects + 1):
        pool = all_scenes(k, sizes=sizes)
        rng.shuffle(pool)
        n_res = min(len(pool) - 1, max(1, round(heldout_fraction * len(pool))))
        reserved[k], train_pool[k] = pool[:n_res], pool[n_res:]
    counts = [1 + i % max_objects for i in range(n_heldout)]
    rng.shuffle(counts)
    used = dict.fromkeys(reserved, 0)
    heldout = []
    for k in counts:
        heldout.append(reserved[k][used[k] % len(reserved[k])])
        used[k] += 1
    train = [rng.choice(train_pool[rng.randint(1, max_objects)]) for _ in range(n_train)]
    return train, heldout


def _balanced(rng: random.Random, n: int) -> list[bool]:
    labels = [i % 2 == 0 for i in range(n)]
    rng.shuffle(labels)
    return labels


def write_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train_scenes: int = 10_000,
    n_heldout_scenes: int = 500,
    n_documents: int | None = None,
    image_size: int = 32,
    shard_size: int = 1000,
    max_objects: int = 3,
    sizes: Sequence[str] = ("large",),
    heldout_fraction: float = 0.15,
    overwrite: bool = False,
) -> dict:
    """Write the synthetic corpus under ``out_dir`` and return its manifest (also ``corpus.json``).

    Training scenes give one image-text pair each, five VQA entries each (one per type, yes/no
    answers balanced over the split) and one 2-3 turn conversation each. ``n_documents``
    (default ``n_train_scenes // 4``) interleaved documents each show 2-3 training scenes.
    Held-out scenes give five VQA entries each and reference captions. An existing corpus in
    ``out_dir`` is an error unless ``overwrite=True``, which first deletes the corpus's own
    files and folders (nothing else in ``out_dir``).
    """
    n_docs = n_train_scenes // 4 if n_documents is None else n_documents
    checks = (
        ("n_train_scenes", n_train_scenes, 1),
        ("n_heldout_scenes", n_heldout_scenes, 1),
        ("n_documents", n_docs, 0),
        ("shard_size", shard_size, 1),
        ("image_size", image_size, 16),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"write_corpus: {name}={value!r} must be an integer >= {low}")
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"write_corpus: heldout_fraction={heldout_fraction} must be in (0, 1)")
    _check_vocab(max_objects, SHAPES, tuple(COLOURS), sizes)
    if "small" in sizes and image_size < MIN_SIZE_FOR_SMALL:
        raise InputError(
            f"write_corpus: sizes={list(sizes)} with image_size={image_size}: small shapes are "
            f"only about 8 px wide there and a small cross looks like a small circle; use "
            f"image_size >= {MIN_SIZE_FOR_SMALL} or sizes=('large',)"
        )
    out = Path(out_dir)
    if (out / "corpus.json").exists():
        if not overwrite:
            raise InputError(
                f"write_corpus: {out} already holds a corpus (corpus.json); pass overwrite=True "
                "to replace it or choose another folder"
            )
        for name in _CORPUS_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("corpus.json", "scenes.json"):
            (out / name).unlink(missing_ok=True)
    for sub in ("images/train", "images/heldout", "pairs", "interleaved", "llava"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    train, heldout = _split_scenes(
        rng, n_train_scenes, n_heldout_scenes, heldout_fraction, max_objects, sizes
    )
    png_cache: dict[tuple, bytes] = {}
    scene_index: dict[str, dict] = {}  # image path (relative to images/) -> scene

    def png(scene: Scene) -> bytes:
        data = png_cache.get(scene.identity)
        if data is None:
            data = png_cache[scene.identity] = encode_png(render_scene(scene, image_size))
        return data

    def write_split(split: str, scenes: list[Scene]) -> tuple[list[str], list[dict], dict]:
        """Write each distinct image once; return per-scene image paths, VQA entries, captions."""
        paths, vqa, refs = [], [], {}
        yes_labels = _balanced(rng, len(scenes))
        for i, scene in enumerate(scenes):
            name = scene_key(scene)
            rel = f"{split}/{name}.png"
            if name not in refs:
                (out / "images" / rel).write_bytes(png(scene))
                refs[name] = reference_captions(scene)
                scene_index[rel] = scene.to_dict()
            paths.append(rel)
            for q in scene_questions(scene, rng, yes=yes_labels[i]):
                vqa.append(vqa_entry(q, rel, f"{split}-{i:06d}-{q.qtype}"))
        return paths, vqa, refs

    train_paths, vqa_train, _ = write_split("train", train)
    _, vqa_heldout, captions_heldout = write_split("heldout", heldout)
    conv_train = [
        conversation(s, rel, rng, conv_id=f"train-{i:06d}-conv")
        for i, (rel, s) in enumerate(zip(train_paths, train))
    ]
    train_ids = [f"train-{i:06d}" for i in range(len(train))]

    pairs = _ShardWriter(out / "pairs", "train", shard_size)
    for sid, scene in zip(train_ids, train):
        meta = json.dumps({"id": sid, **scene.to_dict()}).encode()
        text = caption(scene).encode()
        pairs.add_sample([(f"{sid}.png", png(scene)), (f"{sid}.txt", text), (f"{sid}.json", meta)])
    pairs.close()

    docs = _ShardWriter(out / "interleaved", "train", shard_size)
    for d in range(n_docs):
        key = f"doc-{d:06d}"
        picks = rng.sample(range(len(train)), min(len(train), rng.randint(2, 3)))
        members = [(f"{key}.json", json.dumps(document(key, [train[j] for j in picks])).encode())]
        members += [(f"{key}.{i}.png", png(train[j])) for i, j in enumerate(picks)]
        docs.add_sample(members)
    docs.close()

    files = {
        "vqa_train": "llava/vqa_train.json",
        "vqa_heldout": "llava/vqa_heldout.json",
        "conv_train": "llava/conv_train.json",
        "captions_heldout": "llava/captions_heldout.json",
        "scenes": "scenes.json",
    }
    _dump_json(out / files["vqa_train"], vqa_train)
    for qtype in QTYPES:  # the same entries split by type, for mixtures that weight tasks
        files[f"vqa_train_{qtype}"] = f"llava/vqa_train_{qtype}.json"
        _dump_json(out / files[f"vqa_train_{qtype}"], [e for e in vqa_train if e["qtype"] == qtype])
    _dump_json(out / files["vqa_heldout"], vqa_heldout)
    _dump_json(out / files["conv_train"], conv_train)
    _dump_json(out / files["captions_heldout"], captions_heldout)
    _dump_json(out / files["scenes"], scene_index)

    manifest = {
        "format": "interleaf-synth",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "images_dir": "images",
        "files": {
            "pairs": [p.relative_to(out).as_posix() for p in pairs.paths],
            "interleaved": [p.relative_to(out).as_posix() for p in docs.paths],
            **files,
        },
        "counts": {
            "train_scenes": len(train),
            "heldout_scenes": len(heldout),
            "distinct_train_scenes": len(set(train_paths)),
            "distinct_heldout_scenes": len(captions_heldout),
            "pairs": len(train),
            "documents": n_docs,
            "vqa_train": len(vqa_train),
            "vqa_heldout": len(vqa_heldout),
            "conv_train": len(conv_train),
        },
        "qtypes": list(QTYPES),
        "answers": answer_vocabulary(max_objects),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(sizes),
        "max_objects": max_objects,
        "heldout_fraction": heldout_fraction,
        "caption_prompt": CAPTION_PROMPT,
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def strip_image_markers(text: str) -> str:
    """A LLaVA turn's text without its ``<image>`` markers."""
    return text.replace("<image>\n", "").replace("<image>", "").strip()


def corpus_text(out_dir: str | Path) -> Iterator[str]:
    """Every training text of a written corpus: captions, documents, VQA and conversation turns.

    Yields, in a fixed order: each pair's caption; each document's texts joined by spaces; each
    VQA entry as ``"question answer"``; each conversation as its turns joined by spaces (the
    ``<image>`` marker removed). Held-out files are never read.
    """
    out = Path(out_dir)
    manifest_path = out / "corpus.json"
    if not manifest_path.is_file():
        raise InputError(
            f"corpus_text: {manifest_path} not found; write the corpus first with write_corpus()"
        )
    files = json.loads(manifest_path.read_text())["files"]
    for rel in files["pairs"]:
        with tarfile.open(out / rel) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    yield tar.extractfile(m).read().decode()
    for rel in files["interleaved"]:
        with tarfile.open(out / rel) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    doc = json.loads(tar.extractfile(m).read())
                    yield " ".join(t for t in doc["texts"] if t is not None)

    for key in ("vqa_train", "conv_train"):
        for entry in json.loads((out / files[key]).read_text()):
            yield " ".join(strip_image_markers(turn["value"]) for turn in entry["conversations"])


# --------------------------------------------------------------------------- few-shot


@dataclass
class Episode:
    """A few-shot binding episode: made-up names are defined only by the demonstrations."""

    demo_images: list[Image.Image]
    demo_texts: list[str]  # "this is a dax."
    query_image: Image.Image
    query_text: str  # "this is a"
    answer: str  # the name the demonstrations gave the query's shape
    names: dict[str, str]  # shape -> made-up name, for this episode only
    demo_scenes: list[Scene]
    query_scene: Scene


def fewshot_episodes(
    rng: random.Random,
    n_episodes: int,
    shots: int = 4,
    *,
    ways: int = 2,
    image_size: int = 32,
) -> list[Episode]:
    """Episodes of fast word binding (as in Frozen's "fast concept binding" test).

    Each episode picks ``ways`` shapes and gives each a new name from ``NONSENSE_WORDS``.
    ``shots`` demonstrations show one object each (random colour and cell) with
    ``"this is a {name}."``, every picked shape at least once; the query shows one of the picked
    shapes, again with a random colour and cell, and the answer is its name.
    """
    if not 1 <= ways <= len(SHAPES):
        raise InputError(f"fewshot_episodes: ways={ways} must be between 1 and {len(SHAPES)}")
    if shots < ways:
        raise InputError(
            f"fewshot_episodes: shots={shots} < ways={ways}; every named shape needs at least one "
            "demonstration, so use shots >= ways"
        )

    def single(shape: str) -> Scene:
        obj = SceneObject(shape, rng.choice(list(COLOURS)), "large", rng.randrange(GRID * GRID))
        return Scene((obj,))

    episodes = []
    for _ in range(n_episodes):
        picked = rng.sample(list(SHAPES), ways)
        names = dict(zip(picked, rng.sample(list(NONSENSE_WORDS), ways)))
        demo_shapes = picked + [rng.choice(picked) for _ in range(shots - ways)]
        rng.shuffle(demo_shapes)
        demo_scenes = [single(s) for s in demo_shapes]
        query_scene = single(rng.choice(picked))
        episode = Episode(
            demo_images=[render_scene(s, image_size) for s in demo_scenes],
            demo_texts=[f"this is a {names[s.objects[0].shape]}." for s in demo_scenes],
            query_image=render_scene(query_scene, image_size),
            query_text="this is a",
            answer=names[query_scene.objects[0].shape],
            names=names,
            demo_scenes=demo_scenes,
            query_scene=query_scene,
        )
        episodes.append(episode)
    return episodes


__all__ = [
    "BACKGROUND", "CAPTION_PROMPT", "COLOURS", "NONSENSE_WORDS", "NUMBER_WORDS", "POSITIONS",
    "QTYPES", "SHAPES", "SIZES", "Episode", "Question", "Scene", "SceneObject", "all_scenes",
    "answer_vocabulary", "caption", "conversation", "located_caption", "corpus_text", "document", "encode_png",
    "fewshot_episodes", "make_question", "reference_captions", "render_scene", "sample_scene",
    "scene_key", "scene_questions", "strip_image_markers", "vqa_entry", "write_corpus", "MIN_SIZE_FOR_SMALL",
]
