"""Preference pairs for DPO: the file format, the two token rows of a pair, and their batches.

The format (``format: preference`` in a mixture) follows the LLaVA JSON conventions: a JSON list
or JSON lines, image paths relative to the source's ``images_root`` (``image_path_map`` applies),
``<image>`` placeholders in the prompt, or, with none, the images before the first user text::

    [{"id": "0001", "image": "train/s0123.png",        # or a list of paths; "images" is accepted too
      "prompt": "<image>\\nWhat colour is the circle?",
      "chosen": "red",
      "rejected": "blue"},
     {"id": "0002", "image": ["a.png", "b.png"],
      "prompt": [{"from": "human", "value": "<image> and <image>: which is larger?"},
                 {"from": "gpt", "value": "The first."},
                 {"from": "human", "value": "By how much?"}],
      "chosen": [{"role": "assistant", "content": "Twice as large."}],
      "rejected": "They are equal."}]

``prompt`` is one user turn (a string) or a list of turns, each LLaVA's ``{"from", "value"}`` or a
chat message ``{"role", "content"}`` whose content is a string or TRL's typed parts
(``[{"type": "image"}, {"type": "text", "text": "..."}]``, an image part standing for one
``<image>``); it ends with a user turn. ``chosen`` and ``rejected`` are the assistant's answer to
it: a string, or a list holding one assistant message (TRL's conversational format).

A sample that cannot be used is skipped and counted like any bad sample
(:class:`~interleaf.data.formats.BadSample`): no ``rejected`` or ``chosen`` (``malformed_json``), an
empty answer (``empty_text``), an image that is missing or does not decode, placeholders that do
not match the images.

Tokenisation (:func:`encode_preference`): prompt + chosen and prompt + rejected are each rendered
through the chat template and the prompt format (:func:`~interleaf.data.tokenize.encode_sample`),
so the two rows share the prompt's tokens; the labels are -100 everywhere but the final answer
(the prompt, its images and any earlier assistant turns are not scored). A training sample::

    {"chosen": {"input_ids", "labels", "images", ...}, "rejected": {...},
     "source": str, "loss_weight": float, "key": str, "pair": str}

:func:`collate_preference` batches ``B`` pairs as ``2B`` rows: the chosen rows first, then the
rejected rows in the same order (one forward pass scores both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..processing.prompt_format import IGNORE_INDEX
from .collate import collate
from .formats import (
    LLAVA_IMAGE_PLACEHOLDER,
    LLAVA_ROLES,
    BadSample,
    Conversation,
    ImageSource,
    LlavaRecord,
    parse_conversation,
)
from .tokenize import encode_sample

ANSWERS = ("chosen", "rejected")


@dataclass
class Preference:
    """A prompt (chat messages, images at their placeholders) with a preferred and a rejected answer.

    ``pair`` names the entry in its file (``path[i]`` or ``path:line``): unique within a source,
    so per-pair values (cached reference log-probabilities) are looked up by it.
    """

    prompt: list[dict]  # {"role", "content": list of str | ImageSource}; the last is a user turn
    chosen: str
    rejected: str
    key: str
    pair: str

    @property
    def images(self) -> list[ImageSource]:
        return [p for m in self.prompt for p in m["content"] if isinstance(p, ImageSource)]

    def conversation(self, which: str) -> Conversation:
        """The prompt followed by the ``"chosen"`` or ``"rejected"`` answer as the assistant's turn."""
        answer = {"chosen": self.chosen, "rejected": self.rejected}[which]
        return Conversation([*self.prompt, {"role": "assistant", "content": [answer]}], self.key)


def _text(content: Any, where: str) -> Any:
    """A message's content as LLaVA text: a string as it is; typed parts joined, an image part
    written as ``<image>``. Anything else is returned for :func:`parse_conversation` to refuse."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append(LLAVA_IMAGE_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise BadSample(
                "malformed_json", where,
                f"a content part is {{'type': 'image'}} or {{'type': 'text', 'text': str}}, got {str(part)[:60]}",
            )
    return "".join(out)


def _turns(prompt: Any, where: str) -> list[Any]:
    """``prompt`` (a string or a list of turns) -> LLaVA turns ``{"from", "value"}``."""
    if isinstance(prompt, str):
        return [{"from": "human", "value": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise BadSample("malformed_json", where, "'prompt' must be a string or a non-empty list of turns")
    turns = []
    for turn in prompt:
        if isinstance(turn, dict) and "role" in turn and "from" not in turn:
            turn = {"from": turn["role"], "value": _text(turn.get("content"), where)}
        turns.append(turn)  # parse_conversation checks each turn's role and text
    return turns


def _answer(data: dict, name: str, where: str) -> str:
    """The ``chosen`` / ``rejected`` answer: a string, or a list holding one assistant message."""
    if data.get(name) is None:
        raise BadSample(
            "malformed_json", where, f"no {name!r} answer; a preference sample needs 'prompt', 'chosen' and 'rejected'"
        )
    value = data[name]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        role = message.get("role", message.get("from"))
        if LLAVA_ROLES.get(role) != "assistant":
            raise BadSample("malformed_json", where, f"{name!r} must be the assistant's answer, got role {role!r}")
        value = _text(message.get("content", message.get("value")), where)
    if not isinstance(value, str):
        raise BadSample(
            "malformed_json", where,
            f"{name!r} must be a string or [{{'role': 'assistant', 'content': str}}], got {str(data[name])[:60]}",
        )
    if not value.strip():
        raise BadSample("empty_text", where, f"the {name!r} answer is empty")
    if LLAVA_IMAGE_PLACEHOLDER in value:
        raise BadSample("image_mismatch", where, f"the {name!r} answer holds an <image> placeholder")
    return value


def parse_preference(
    record: LlavaRecord,
    *,
    images_root: str | Path | None = None,
    image_path_map: dict[str, str] | None = None,
    task_prompt: str | None = None,
) -> Preference:
    """A preference entry (see the module docstring) -> :class:`Preference`, or :class:`BadSample`.

    The prompt is read as a LLaVA conversation, so every LLaVA rule holds for it (placeholders,
    image paths, ``task_prompt`` after the first user turn).
    """
    where = record.where
    if record.error is not None or record.data is None:
        raise BadSample("malformed_json", where, record.error or "not a JSON object")
    data = record.data
    if "prompt" not in data:
        raise BadSample("malformed_json", where, "no 'prompt'; a preference sample needs 'prompt', 'chosen' and 'rejected'")
    if "image" in data and "images" in data:
        raise BadSample("malformed_json", where, "give the images as 'image' or as 'images', not both")
    chosen, rejected = _answer(data, "chosen", where), _answer(data, "rejected", where)
    llava = {"id": data.get("id", where), "conversations": [*_turns(data["prompt"], where), {"from": "gpt", "value": chosen}]}
    if data.get("image", data.get("images")) is not None:
        llava["image"] = data.get("image", data.get("images"))
    conversation = parse_conversation(
        LlavaRecord(llava, where), images_root=images_root, image_path_map=image_path_map, task_prompt=task_prompt
    )
    prompt = conversation.messages[:-1]
    if prompt[-1]["role"] != "user":
        raise BadSample("malformed_json", where, f"the prompt must end with a user turn, not a {prompt[-1]['role']} turn")
    return Preference(prompt, chosen, rejected, conversation.key, where)


# --------------------------------------------------------------------------- tokens and batches


def _answer_labels(labels: list[int], earlier_turns: int, where: str, which: str) -> list[int]:
    """``labels`` with only the final answer's runs kept: the first ``earlier_turns`` runs of
    trained tokens are the prompt's own assistant turns (one run each) and are set to -100."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    if len(runs) <= earlier_turns:
        raise BadSample("no_trainable_tokens", where, f"truncation to max_length cut the {which} answer away")
    start = runs[earlier_turns][0]
    return [IGNORE_INDEX] * start + labels[start:]


def encode_preference(
    parsed: Preference,
    processor,
    *,
    source: str,
    max_length: int | None = None,
    max_images: int = 6,
    loss_weight: float = 1.0,
    **_: Any,
) -> dict:
    """A :class:`Preference` -> the training sample of the module docstring (or :class:`BadSample`).

    Each row is what :func:`~interleaf.data.tokenize.encode_sample` makes of the conversation
    prompt + answer (chat template, prompt format, truncation that never splits an image), with
    the labels of every assistant turn but the final answer set to -100.
    """
    earlier = sum(1 for m in parsed.prompt if m["role"] == "assistant")
    out: dict[str, Any] = {"source": source, "loss_weight": float(loss_weight), "key": parsed.key, "pair": parsed.pair}
    for which in ANSWERS:
        row = encode_sample(
            parsed.conversation(which), processor, source=source, max_length=max_length, max_images=max_images,
            loss_weight=loss_weight,
        )
        row["labels"] = _answer_labels(row["labels"], earlier, parsed.pair, which)
        out[which] = row
    return out


def is_preference_sample(sample: Any) -> bool:
    return isinstance(sample, dict) and all(isinstance(sample.get(k), dict) for k in ANSWERS)


def collate_preference(samples: list[dict], pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """``B`` preference samples -> one batch of ``2B`` rows (chosen rows, then rejected rows), as
    :func:`~interleaf.data.collate.collate` pads them, plus ``"pairs": B``."""
    for b, s in enumerate(samples):
        if not is_preference_sample(s):
            raise InputError(
                f"collate_preference: sample {b} is not a preference pair (no 'chosen' / 'rejected' rows); "
                "read preference data from a source with format: preference"
            )
    rows = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    batch = collate(rows, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["pairs"] = len(samples)
    return batch


__all__ = [
    "ANSWERS", "Preference", "collate_preference", "encode_preference", "is_preference_sample", "parse_preference",
]
