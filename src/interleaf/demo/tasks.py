"""The synthetic corpus's evaluation tasks: held-out VQA, held-out captions, word binding.

``synth-vqa`` and ``synth-caption`` read a corpus written by
:func:`interleaf.data.synth.write_corpus` (pass its folder as the data directory);
``synth-fewshot`` generates its episodes and reads nothing. Importing this module registers the
tasks and their adapters with :mod:`interleaf.evaluation.tasks`, which imports it the first time
the registry is used (it is named in that module's ``TASK_MODULES``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

from ..data.synth import CAPTION_PROMPT, CORPUS_FILES, Scene, caption, fewshot_episodes
from ..evaluation.tasks import register_task
from ..evaluation.tasks.adapters import DataContext, adapter, load_llava, split_key
from ..evaluation.tasks.builtin import CAPTION_STOP, VQA_STOP
from ..evaluation.tasks.spec import Example, PromptTemplate, TaskSpec
from ..files import read_json


@adapter("synth_vqa")
def load_synth_vqa(ctx: DataContext, split: str) -> list[Example]:
    return load_llava(dataclasses.replace(ctx, images_dir=ctx.images_dir or ctx.data_dir / "images"), split)


@adapter("synth_caption")
def load_synth_caption(ctx: DataContext, split: str) -> list[Example]:
    """Held-out: ``captions_heldout.json``; train: ``scenes.json`` train images + canonical captions."""
    images = ctx.images_dir or ctx.data_dir / "images"
    if split == "train":
        scenes = read_json(ctx.path("scenes"), f"task {ctx.task.name!r}")
        return [
            Example(id=Path(rel).stem, images=[images / rel], fields={"caption": caption(Scene.from_dict(s))},
                    answers=[caption(Scene.from_dict(s))])
            for rel, s in scenes.items() if rel.startswith("train/")
        ]
    refs = read_json(ctx.path(split_key(ctx, split)), f"task {ctx.task.name!r}")
    return [
        Example(id=key, images=[images / "heldout" / f"{key}.png"], fields={"caption": r[0]}, answers=list(r))
        for key, r in refs.items()
    ]


@adapter("synth_fewshot")
def load_synth_fewshot(ctx: DataContext, split: str) -> list[Example]:
    """Generated word-binding episodes; each example carries its own demonstrations.

    Options: ``episodes`` (default 100), ``shots`` (demonstrations per episode, default 4),
    ``ways`` (default 2), ``seed`` (default 0, also hashed with the split).
    """
    n = int(ctx.options.get("episodes", 100))
    shots = int(ctx.options.get("shots", 4))
    ways = int(ctx.options.get("ways", 2))
    seed = int(hashlib.sha256(f"{ctx.options.get('seed', 0)}:{split}".encode()).hexdigest()[:8], 16)
    out = []
    for i, ep in enumerate(fewshot_episodes(random.Random(seed), n, shots=shots, ways=ways)):
        names = sorted(ep.names.values())
        eid = f"{split}-{i:05d}"
        demos = [
            Example(id=f"{eid}/demo{j}", images=[img], fields={"text": t.removeprefix("this is a ").rstrip("."),
                                                               "answer": t.removeprefix("this is a ").rstrip(".")})
            for j, (img, t) in enumerate(zip(ep.demo_images, ep.demo_texts))
        ]
        out.append(Example(
            id=eid, images=[ep.query_image], fields={"answer": ep.answer}, answers=[ep.answer],
            candidates=names, label=names.index(ep.answer), demos=demos,
        ))
    return out


_VQA_CHAT = "<image>\n{question}"
_CAPTION_CHAT = "<image>\n" + CAPTION_PROMPT  # the corpus's own caption request

SYNTH_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="synth-vqa", adapter="synth_vqa", metric="exact_match", postprocess="vqa",
        templates={
            "openflamingo": PromptTemplate(demo="<image>Question:{question} Short answer:{answer}<|endofchunk|>",
                                           chat_user=_VQA_CHAT),
            "idefics": PromptTemplate(demo="<image>Question: {question} Answer: {answer}\n",
                                      query="<image>Question: {question} Answer:", chat_user=_VQA_CHAT),
        },
        files={"train": CORPUS_FILES["vqa_train"], "test": CORPUS_FILES["vqa_heldout"]}, max_new_tokens=4,
        stop=VQA_STOP, source="interleaf.data.write_corpus(DIR)",
        description="synthetic held-out VQA, exact match per question type",
    ),
    TaskSpec(
        name="synth-caption", adapter="synth_caption", metric="cider", postprocess="caption",
        templates={
            "openflamingo": PromptTemplate(demo="<image>Output:{caption}<|endofchunk|>", answer_field="caption",
                                           chat_user=_CAPTION_CHAT),
            "idefics": PromptTemplate(demo="<image>Caption: {caption}\n", query="<image>Caption:",
                                      answer_field="caption", chat_user=_CAPTION_CHAT),
        },
        files={"scenes": CORPUS_FILES["scenes"], "test": CORPUS_FILES["captions_heldout"]}, max_new_tokens=24,
        stop=CAPTION_STOP, source="interleaf.data.write_corpus(DIR)", description="synthetic held-out captions, CIDEr",
    ),
    TaskSpec(
        name="synth-fewshot", adapter="synth_fewshot", request="rank", metric="accuracy", rank_reduce="mean",
        templates={
            "openflamingo": PromptTemplate(demo="<image>this is a {answer}.<|endofchunk|>", query="<image>this is a",
                                           continuation=" {candidate}"),
            "idefics": PromptTemplate(demo="<image>this is a {answer}.\n", query="<image>this is a",
                                      continuation=" {candidate}"),
        },
        demo_split="test", eval_split="test", description="synthetic word binding: names defined only by the demos",
    ),
)

for _spec in SYNTH_TASKS:
    register_task(_spec)
