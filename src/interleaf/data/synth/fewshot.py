"""Few-shot word-binding episodes over single-object scenes."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from ...errors import InputError
from .scenes import COLOURS, GRID, SHAPES, Scene, SceneObject, render_scene

NONSENSE_WORDS: tuple[str, ...] = (
    "dax", "blicket", "wug", "zorp", "fep", "toma", "kiki", "gazzer",
    "modi", "tupa", "lorp", "mib", "zav", "pilk", "rell", "snib",
)


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
