"""Few-shot prompts: choosing demonstrations (random or RICES) and rendering them with images.

Demonstrations come from the task's demonstration split. ``RandomDemos`` draws a fixed query set
per trial (OpenFlamingo: 2048 examples) and then, for each evaluated example, ``k`` of it with a
generator seeded by ``(trial seed, example id)``, never by the process rank, so every process
and every batch size picks the same demonstrations. ``RICESDemos`` (in :mod:`.rices`) picks the
most similar images instead. An example is never its own demonstration (compared by
``meta["source_id"]`` when present, e.g. the rotations of one MMBench question, else by id).

A rendered prompt is ``instruction, demo_1, ..., demo_k, query`` in the model's prompt format,
each demonstration with its images; with the zero-shot trick (OpenFlamingo), a 0-shot prompt gets
two text-only demonstrations instead (their images are dropped, never left attached).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Protocol

from ..errors import InputError
from .tasks.spec import Example, PromptTemplate

ZERO_SHOT_TRICK_DEMOS = 2


def example_seed(trial_seed: int, key: str) -> int:
    """A 64-bit seed from the trial seed and an example id (stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256(f"{trial_seed}\x00{key}".encode()).digest()[:8], "big")


def source_id(example: Example) -> str:
    return str(example.meta.get("source_id", example.id))


class DemoSampler(Protocol):
    def sample(self, query: Example, k: int) -> list[Example]: ...


class RandomDemos:
    """Random demonstrations from a fixed per-trial query set."""

    def __init__(self, pool: list[Example], trial_seed: int, query_set_size: int = 2048):
        self.trial_seed = trial_seed
        rng = random.Random(example_seed(trial_seed, "\x00query-set"))
        self.pool = rng.sample(pool, min(len(pool), query_set_size)) if query_set_size else list(pool)

    def sample(self, query: Example, k: int) -> list[Example]:
        if k == 0:
            return []
        own = source_id(query)
        candidates = [d for d in self.pool if source_id(d) != own]
        if k > len(candidates):
            raise InputError(
                f"{k} demonstrations asked for example {query.id!r} but the query set has only {len(candidates)} "
                "other examples; use fewer shots or a larger demonstration split"
            )
        rng = random.Random(example_seed(self.trial_seed, query.id))
        return rng.sample(candidates, k)


class FixedDemos:
    """The demonstrations that come with each example (few-shot episodes): the first ``k``."""

    def sample(self, query: Example, k: int) -> list[Example]:
        demos = query.demos or []
        if k > len(demos):
            raise InputError(f"example {query.id!r} comes with {len(demos)} demonstrations; {k} asked")
        return demos[:k]


def render_prompt(
    template: PromptTemplate, demos: list[Example], query: Example, *, text_only_demos: bool = False
) -> list[Any]:
    """``[instruction, *demo items, *query items]`` as processor prompt items (text and images)."""
    items: list[Any] = [template.instruction] if template.instruction else []
    for d in demos:
        items += template.render(d, demo=True, with_images=not text_only_demos)
    items += template.render(query, demo=False)
    return _merge_text(items)


def render_chat(template: PromptTemplate, demos: list[Example], query: Example) -> list[dict]:
    """The prompt as chat messages: each demonstration a user/assistant turn, then the query's turn."""
    if template.chat_user is None:
        raise InputError("this task's template has no chat_user turn; evaluate without chat rendering")
    messages: list[dict] = []
    if template.instruction:
        messages.append({"role": "system", "content": template.instruction})
    for ex in [*demos, query]:
        for q, a in ex.meta.get("history_turns", []):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": template.render(ex, demo=False, text=template.chat_user)})
        if ex is not query:
            messages.append({"role": "assistant", "content": str(ex.fields[template.answer_field])})
    return messages


def _merge_text(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] += item
        else:
            out.append(item)
    return out


def prompt_text(prompt: list[Any], image_mark: str = "<image>") -> str:
    """A readable rendering of a prompt for logs: images as ``<image>``."""
    if prompt and isinstance(prompt[0], dict) and "role" in prompt[0]:
        return "".join(f"[{m['role']}] {prompt_text(m['content']) if isinstance(m['content'], list) else m['content']}\n"
                       for m in prompt)
    return "".join(item if isinstance(item, str) else image_mark for item in prompt)
