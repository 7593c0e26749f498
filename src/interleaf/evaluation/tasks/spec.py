"""Typed task specs: what to read, how to prompt, what to ask the model, how to score.

A :class:`TaskSpec` names a dataset adapter (which reads local files into :class:`Example` s), the
split that supplies demonstrations and the split that is evaluated, one :class:`PromptTemplate`
per prompt format (``openflamingo`` / ``idefics``), the request type (``generate`` text, or
``rank`` candidate continuations by log-likelihood), the post-processing of generated text, the
metric and how candidate scores are reduced (``sum`` or ``mean`` of token log-probs).

Templates are plain strings with ``<image>`` where the example's next image goes and
``{field}`` placeholders filled from the example's fields; :meth:`PromptTemplate.render` turns
them into the processor's prompt items (text and images)::

    "<image>Question:{question} Short answer:{answer}<|endofchunk|>"
        -> [image, "Question:what colour? Short answer:red<|endofchunk|>"]
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import ConfigError, InputError
from ...schema import setting, validate

IMAGE_MARK = "<image>"
PROMPT_FAMILIES = ("openflamingo", "idefics", "llava")
# A prompt format without a template of its own in a task borrows this one's: the token-insertion
# family ("llava") writes few-shot prompts as OpenFlamingo does (image, prompt, answer, then
# <|endofchunk|>), the format xGen-MM's base model was trained with.
TEMPLATE_FALLBACK = {"llava": "openflamingo"}
REQUESTS = ("generate", "rank")
POSTPROCESS = ("none", "strip", "vqa", "caption", "choice", "yes_no")
METRICS = ("vqa_accuracy", "exact_match", "cider", "accuracy", "roc_auc", "circular", "mme", "choice_accuracy")


@dataclass
class Example:
    """One sample of a dataset split.

    ``images`` are anything the processor accepts (paths, PIL images, bytes); ``fields`` fill the
    template (``question``, ``answer``, ``caption``, ...); ``answers`` are the references of
    generation tasks; ``label`` the index of the right candidate of ranking tasks; ``group`` the
    subtask used for per-group breakdowns (question type, category); ``demos`` fixed
    demonstrations that come with the example (few-shot episodes) instead of sampled ones.
    """

    id: str
    images: list[Any] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    candidates: list[str] | None = None
    label: int | None = None
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    demos: list["Example"] | None = None


@dataclass
class PromptTemplate:
    """How one example is written in one prompt format.

    ``demo`` renders a demonstration (with its answer); ``query`` the evaluated example (without;
    by default ``demo`` cut just before ``{<answer_field>}``). ``continuation`` renders a ranked
    candidate (``{candidate}``), appended to the query. ``instruction`` is text put first.
    """

    demo: str
    query: str | None = None
    continuation: str = "{candidate}"
    instruction: str = ""
    answer_field: str = "answer"
    chat_user: str | None = None  # chat rendering: the user turn (e.g. "<image>\n{question}")

    def __post_init__(self) -> None:
        validate(self, "template")

    def _check(self, path: str) -> None:
        if self.query is None:
            mark = "{" + self.answer_field + "}"
            if mark not in self.demo:
                raise ConfigError(
                    f"{path}.query", f"is not given and the demo template {self.demo!r} lacks {mark}",
                    f"write the query template, or put {mark} in the demo template",
                )
            self.query = self.demo[: self.demo.index(mark)]

    def render(self, example: Example, *, demo: bool, with_images: bool = True, text: str | None = None) -> list[Any]:
        """The prompt items of ``example``: strings and its images at the ``<image>`` marks.

        ``with_images=False`` drops the marks and the images (text-only demonstrations).
        ``text`` renders another template string (the chat user turn) the same way.
        """
        if text is None:
            text = self.demo if demo else self.query
        filled = _fill(text, example)
        pieces = filled.split(IMAGE_MARK)
        items: list[Any] = []
        n_marks = len(pieces) - 1
        if with_images and n_marks > len(example.images):
            raise InputError(
                f"example {example.id!r}: the template has {n_marks} {IMAGE_MARK} marks but the example "
                f"has {len(example.images)} images"
            )
        for i, piece in enumerate(pieces):
            if i > 0 and with_images:
                image = example.images[i - 1]
                items.append({"image": image} if isinstance(image, str) else image)  # a str would read as text
            if piece:
                items.append(piece)
        return items

    def render_candidate(self, candidate: str) -> str:
        return self.continuation.format(candidate=candidate)


def _fill(text: str, example: Example) -> str:
    names = {f for _, f, _, _ in string.Formatter().parse(text) if f}
    missing = names - set(example.fields)
    if missing:
        raise InputError(
            f"example {example.id!r} lacks the fields {sorted(missing)} that the prompt template "
            f"{text!r} uses; it has {sorted(example.fields)}"
        )
    return text.format(**{k: example.fields[k] for k in names})


@dataclass
class TaskSpec:
    """Everything that defines an evaluation task. See the module docstring."""

    name: str = setting(nonempty=True)
    adapter: str = setting(nonempty=True)  # a key of interleaf.evaluation.tasks.adapters.ADAPTERS
    templates: dict[str, PromptTemplate] = setting()
    request: Literal[REQUESTS] = "generate"
    metric: Literal[METRICS] = "exact_match"
    postprocess: Literal[POSTPROCESS] = "strip"
    files: dict[str, str] = field(default_factory=dict)  # adapter arguments (paths relative to the data dir)
    demo_split: str = "train"
    eval_split: str = "test"
    max_new_tokens: int = 10
    num_beams: int = 1
    stop: list[str] = field(default_factory=list)
    length_penalty: float | None = None
    rank_reduce: Literal["sum", "mean"] = "sum"
    positive: str | None = None  # roc_auc: the candidate whose normalised probability is the score
    vqa_mode: str = "official"
    query_set_size: int = 2048
    description: str = ""
    source: str = ""  # where the public dataset's files come from (for missing-file errors)

    def __post_init__(self) -> None:
        validate(self, f"task {self.name}")

    def _check(self, path: str) -> None:
        unknown = set(self.templates) - set(PROMPT_FAMILIES)
        if unknown or not self.templates:
            raise ConfigError(
                f"{path}.templates", f"has families {sorted(self.templates)}",
                f"give a template for at least one of {list(PROMPT_FAMILIES)} and no others",
            )
        if self.metric == "roc_auc" and (self.request != "rank" or self.positive is None):
            raise ConfigError(f"{path}.metric", "roc_auc needs request: rank and a positive candidate",
                              "set request: rank and positive: <candidate>")

    def template(self, family: str) -> PromptTemplate:
        """The template for the prompt format ``family``: its own, else :data:`TEMPLATE_FALLBACK`'s
        choice, else the task's only one."""
        if family in self.templates:
            return self.templates[family]
        if TEMPLATE_FALLBACK.get(family) in self.templates:
            return self.templates[TEMPLATE_FALLBACK[family]]
        if len(self.templates) == 1:
            return next(iter(self.templates.values()))
        raise ConfigError(f"task {self.name}.templates", f"has no template for the prompt format {family!r}",
                          f"add one; it has {sorted(self.templates)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
