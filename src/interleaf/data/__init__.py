"""Data: sample formats, WebDataset shards and the synthetic shape-scene corpus."""

from .synth import (
    QTYPES,
    Episode,
    Question,
    Scene,
    SceneObject,
    caption,
    corpus_text,
    fewshot_episodes,
    make_question,
    reference_captions,
    render_scene,
    sample_scene,
    scene_questions,
    write_corpus,
)

__all__ = [
    "QTYPES",
    "Episode",
    "Question",
    "Scene",
    "SceneObject",
    "caption",
    "corpus_text",
    "fewshot_episodes",
    "make_question",
    "reference_captions",
    "render_scene",
    "sample_scene",
    "scene_questions",
    "write_corpus",
]
