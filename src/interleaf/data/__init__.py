"""Data: sample formats, WebDataset shards, mixtures, streaming, collation and the synthetic corpus."""

from .collate import collate
from .formats import REASONS, BadSample, iter_tar_samples, load_llava, parse_conversation, parse_document, parse_pair
from .mixture import MixtureConfig, SourceConfig, load_mixture
from .stream import BadSampleCounter, MixtureStream, iter_source
from .tokenize import encode_sample, tokenize_conversation, tokenize_document, tokenize_pair
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
    "REASONS",
    "BadSample",
    "BadSampleCounter",
    "MixtureConfig",
    "MixtureStream",
    "SourceConfig",
    "collate",
    "encode_sample",
    "iter_source",
    "iter_tar_samples",
    "load_llava",
    "load_mixture",
    "parse_conversation",
    "parse_document",
    "parse_pair",
    "tokenize_conversation",
    "tokenize_document",
    "tokenize_pair",
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
