"""The text of the synthetic corpus: captions, questions with one-word answers, LLaVA entries.

Five question types, each with one-word answers: ``colour`` ("what colour is the circle?"),
``shape`` ("what shape is the red object?"), ``count`` ("how many objects are there?" ->
"two"), ``position`` ("is the circle on the left or the right?" / "is the circle at the top or
the bottom?") and ``yesno`` ("is there a blue triangle?").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import InputError
from .scenes import COLOURS, SHAPES, Scene, SceneObject

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QTYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "yesno")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
CAPTION_PROMPT = "describe the image."


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


def strip_image_markers(text: str) -> str:
    """A LLaVA turn's text without its ``<image>`` markers."""
    return text.replace("<image>\n", "").replace("<image>", "").strip()
