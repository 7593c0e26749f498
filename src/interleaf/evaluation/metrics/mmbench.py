"""MMBench CircularEval: a question counts only if every rotation of its options is answered right.

Definition followed: MMBench (Liu et al. 2023), CircularEval. A question with N options is asked N
times, the options rotated circularly each time (rotation r puts option r first); the question is
passed only when all N answers pick the correct option. VanillaEval, reported beside it, scores
the original order only (rotation 0), as the MMBench paper does.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from interleaf.errors import InputError


@dataclass(frozen=True)
class CircularRecord:
    """One answered rotation of an MMBench question.

    ``prediction`` is the extracted letter, or ``None`` when no letter could be read (wrong).
    ``answer`` is the correct letter *for this rotation*.
    """

    question_index: Hashable
    rotation: int
    prediction: str | None
    answer: str


def circular_rotations(options: Sequence[str], answer_index: int) -> list[tuple[list[str], int]]:
    """All N circular rotations of ``options``, each with the new index of the correct option.

    Rotation r is ``options[r:] + options[:r]``; rotation 0 is the original order.

    >>> circular_rotations(["cat", "dog", "cow"], 1)
    [(['cat', 'dog', 'cow'], 1), (['dog', 'cow', 'cat'], 0), (['cow', 'cat', 'dog'], 2)]
    """
    n = len(options)
    if isinstance(options, str) or n < 2:
        raise InputError(f"circular_rotations: needs a list of 2+ options, got {options!r}.")
    if not 0 <= answer_index < n:
        raise InputError(
            f"circular_rotations: answer_index {answer_index} is outside the {n} options."
        )
    opts = list(options)
    return [(opts[r:] + opts[:r], (answer_index - r) % n) for r in range(n)]


def index_to_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ... (MMBench labels options with capital letters)."""
    if not 0 <= index < 26:
        raise InputError(f"option index {index} has no letter; at most 26 options (A-Z).")
    return string.ascii_uppercase[index]


def _as_record(item: CircularRecord | Mapping[str, Any], i: int) -> CircularRecord:
    if isinstance(item, CircularRecord):
        return item
    try:
        return CircularRecord(
            item["question_index"], int(item["rotation"]), item["prediction"], str(item["answer"])
        )
    except KeyError as exc:
        raise InputError(
            f"CircularEval record {i} lacks the key {exc}; each record needs 'question_index', "
            "'rotation', 'prediction' and 'answer'."
        ) from None


def _correct(rec: CircularRecord) -> bool:
    if rec.prediction is None:
        return False
    return rec.prediction.strip().upper() == rec.answer.strip().upper()


def circular_eval(records: Iterable[CircularRecord | Mapping[str, Any]]) -> dict[str, Any]:
    """CircularEval and VanillaEval accuracies from per-rotation records, side by side.

    Returns ``{"circular_accuracy", "vanilla_accuracy", "all_rotations_accuracy", "vanilla",
    "n_questions", "n_records"}``: ``circular_accuracy`` passes a question only if all its
    rotations are right; ``vanilla_accuracy`` scores rotation 0 only (named in ``"vanilla"``);
    ``all_rotations_accuracy`` is the plain mean over every record. Every question needs its
    rotation 0, and a rotation may appear once per question.
    """
    by_question: dict[Hashable, dict[int, bool]] = defaultdict(dict)
    n_records = 0
    for i, item in enumerate(records):
        rec = _as_record(item, i)
        rotations = by_question[rec.question_index]
        if rec.rotation in rotations:
            raise InputError(
                f"CircularEval: question {rec.question_index!r} has rotation {rec.rotation} twice; "
                "give each (question, rotation) pair once."
            )
        rotations[rec.rotation] = _correct(rec)
        n_records += 1
    if not by_question:
        raise InputError("circular_eval: no records given.")
    no_first = [q for q, rots in by_question.items() if 0 not in rots]
    if no_first:
        raise InputError(
            f"CircularEval: questions {no_first[:5]} lack rotation 0 (the original option order), "
            "which VanillaEval scores; include it."
        )
    n = len(by_question)
    flags = [f for rots in by_question.values() for f in rots.values()]
    return {
        "circular_accuracy": sum(all(r.values()) for r in by_question.values()) / n,
        "vanilla_accuracy": sum(r[0] for r in by_question.values()) / n,
        "all_rotations_accuracy": sum(flags) / len(flags),
        "vanilla": "rotation 0 (original option order) only",
        "n_questions": n,
        "n_records": n_records,
    }
