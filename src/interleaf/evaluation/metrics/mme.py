"""MME scores: per-subtask accuracy and accuracy+, perception and cognition totals.

Definition followed: MME (Fu et al. 2023) and its official ``eval_tool/calculation.py``. Every
image carries two yes/no questions (one answered yes, one no). Per subtask:

* accuracy: fraction of questions answered right;
* accuracy+: fraction of images whose two questions are both right;
* score = 100 x (accuracy + accuracy+), at most 200.

Perception sums its 10 subtasks (at most 2000), cognition its 4 (at most 800).

A prediction is read as the official tool does: lower case (we also strip surrounding
whitespace); exactly ``yes``/``no``; otherwise ``yes`` if "yes" occurs in its first four
characters, else ``no`` if "no" does, else ``other``, which counts as wrong.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from interleaf.errors import InputError

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR",
)  # fmt: skip
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
_CANONICAL = {name.lower(): name for name in MME_PERCEPTION + MME_COGNITION}


@dataclass(frozen=True)
class MMERecord:
    """One answered MME question."""

    image_id: Hashable
    subtask: str
    prediction: str
    answer: str  # "yes" or "no"


def mme_parse_yes_no(prediction: str) -> str:
    """Map a free-text prediction to ``"yes"``, ``"no"`` or ``"other"`` by MME's rule."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _canonical_subtask(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key not in _CANONICAL:
        raise InputError(
            f"MME subtask {name!r} is unknown; expected one of "
            f"{list(MME_PERCEPTION + MME_COGNITION)}."
        )
    return _CANONICAL[key]


def _as_record(item: MMERecord | Mapping[str, Any], index: int) -> MMERecord:
    if isinstance(item, MMERecord):
        return item
    try:
        return MMERecord(
            item["image_id"], str(item["subtask"]), str(item["prediction"]), str(item["answer"])
        )
    except KeyError as exc:
        raise InputError(
            f"MME record {index} lacks the key {exc}; each record needs 'image_id', 'subtask', "
            "'prediction' and 'answer'."
        ) from None


def mme_scores(
    records: Iterable[MMERecord | Mapping[str, Any]], require_pairs: bool = True
) -> dict[str, Any]:
    """Score MME from answered questions (``MMERecord`` or dicts with the same keys).

    Returns ``{"subtasks": {name: {"accuracy", "accuracy_plus", "score", "n_questions",
    "n_images", "n_other"}}, "perception", "perception_max", "cognition", "cognition_max",
    "missing_subtasks"}``. Accuracies are fractions; scores are on MME's 0-200 per-subtask scale.
    Totals sum the subtasks present; ``missing_subtasks`` names the absent ones. With
    ``require_pairs`` (default) every image must have exactly two questions, as in MME; with
    ``False`` an image counts for accuracy+ when all of its questions are right.
    """
    # subtask -> image -> list of correctness flags
    groups: dict[str, dict[Hashable, list[bool]]] = defaultdict(lambda: defaultdict(list))
    others: dict[str, int] = defaultdict(int)
    for i, item in enumerate(records):
        rec = _as_record(item, i)
        answer = rec.answer.strip().lower()
        if answer not in ("yes", "no"):
            raise InputError(
                f"MME record {i} (image {rec.image_id!r}): answer must be 'yes' or 'no', "
                f"got {rec.answer!r}."
            )
        subtask = _canonical_subtask(rec.subtask)
        parsed = mme_parse_yes_no(rec.prediction)
        others[subtask] += parsed == "other"
        groups[subtask][rec.image_id].append(parsed == answer)
    if not groups:
        raise InputError("mme_scores: no records given.")

    subtasks: dict[str, dict[str, float | int]] = {}
    for name, images in groups.items():
        if require_pairs:
            bad = [img for img, flags in images.items() if len(flags) != 2]
            if bad:
                raise InputError(
                    f"MME subtask {name!r}: images {bad[:5]} do not have exactly two questions; "
                    "evaluate both questions of every image, or pass require_pairs=False."
                )
        flags = [f for per_image in images.values() for f in per_image]
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(per_image) for per_image in images.values()) / len(images)
        subtasks[name] = {
            "accuracy": acc,
            "accuracy_plus": acc_plus,
            "score": 100.0 * (acc + acc_plus),
            "n_questions": len(flags),
            "n_images": len(images),
            "n_other": others[name],
        }
    return {
        "subtasks": subtasks,
        "perception": sum(subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks),
        "perception_max": 200.0 * len(MME_PERCEPTION),
        "cognition": sum(subtasks[n]["score"] for n in MME_COGNITION if n in subtasks),
        "cognition_max": 200.0 * len(MME_COGNITION),
        "missing_subtasks": [n for n in MME_PERCEPTION + MME_COGNITION if n not in subtasks],
    }
