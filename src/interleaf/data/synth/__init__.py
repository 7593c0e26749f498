"""A synthetic corpus of rendered shape scenes, written in the on-disk formats of real datasets.

The demo trains a tiny vision-language model from scratch, so the corpus is built to be
learnable in minutes and unambiguous by construction. Its parts:

- :mod:`.scenes`: scenes of 1-4 shapes on a 2x2 grid, their deterministic rendering and PNG bytes;
- :mod:`.text`: captions, the five question types with one-word answers, LLaVA-format entries;
- :mod:`.corpus`: :func:`write_corpus` (pairs, interleaved documents, LLaVA JSON, held-out split)
  and :func:`corpus_text`, which reads a written corpus's training text back;
- :mod:`.fewshot`: word-binding episodes whose made-up names only the demonstrations define.
"""

from __future__ import annotations

from .corpus import CORPUS_FILES, corpus_text, write_corpus
from .fewshot import NONSENSE_WORDS, Episode, fewshot_episodes
from .scenes import (
    BACKGROUND,
    COLOURS,
    GRID,
    MIN_SIZE_FOR_SMALL,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    all_scenes,
    encode_png,
    render_scene,
    sample_scene,
    scene_key,
)
from .text import (
    CAPTION_PROMPT,
    NUMBER_WORDS,
    POSITIONS,
    QTYPES,
    Question,
    answer_vocabulary,
    caption,
    conversation,
    document,
    located_caption,
    make_question,
    reference_captions,
    scene_questions,
    strip_image_markers,
    vqa_entry,
)

__all__ = [
    "BACKGROUND", "CAPTION_PROMPT", "COLOURS", "CORPUS_FILES", "GRID", "MIN_SIZE_FOR_SMALL", "NONSENSE_WORDS",
    "NUMBER_WORDS", "POSITIONS", "QTYPES", "SHAPES", "SIZES", "Episode", "Question", "Scene", "SceneObject",
    "all_scenes", "answer_vocabulary", "caption", "conversation", "corpus_text", "document", "encode_png",
    "fewshot_episodes", "located_caption", "make_question", "reference_captions", "render_scene",
    "sample_scene", "scene_key", "scene_questions", "strip_image_markers", "vqa_entry", "write_corpus",
]
