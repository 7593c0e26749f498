"""Scenes of the synthetic corpus and their rendering.

A scene holds 1-3 objects (``max_objects``, at most 4), each in its own cell of a 2x2 grid
(cells numbered row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), each with a
distinct shape (circle, square, triangle, cross) and a distinct colour (red, green, blue, yellow,
white) on a black background. "the circle" and "the red object" always name exactly one object,
and "left/right", "top/bottom" follow from the cell alone.

Rendering is a pure function of the scene: no jitter, no anti-aliasing, so the same scene always
gives the same pixels (and the same PNG bytes). Scene identity is the set of ``(shape, colour,
cell, size)`` tuples; :func:`scene_key` names it.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ...errors import InputError

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


def check_vocab(
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
    check_vocab(max_objects, shapes, colours, sizes)
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
