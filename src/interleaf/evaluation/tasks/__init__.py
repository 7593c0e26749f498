"""The task registry: shipped benchmark specs, user tasks from YAML, and ``llava:PATH`` tasks.

``get_task(name)`` accepts a registered name (``interleaf eval --task vqav2``), a path to a YAML
file of :class:`TaskSpec` fields (optionally ``base: <registered name>`` to override a shipped
task), or ``llava:PATH`` for a LLaVA-format JSON of one's own. ``load_examples`` reads a split
through the task's adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ...data.synth import CAPTION_PROMPT
from ...errors import ConfigError, InputError
from .adapters import ADAPTERS, DataContext
from .spec import PROMPT_FAMILIES, Example, PromptTemplate, TaskSpec

TASKS: dict[str, TaskSpec] = {}

OF_CAPTION = PromptTemplate(demo="<image>Output:{caption}<|endofchunk|>", answer_field="caption")
ID_CAPTION = PromptTemplate(demo="<image>Caption: {caption}\n", query="<image>Caption:", answer_field="caption")
OF_VQA = PromptTemplate(demo="<image>Question:{question} Short answer:{answer}<|endofchunk|>")
ID_VQA = PromptTemplate(demo="<image>Question: {question} Answer: {answer}\n", query="<image>Question: {question} Answer:")
OF_CHOICE = PromptTemplate(demo="<image>{hint}\nQuestion: {question}\nOptions:\n{options}\nAnswer:{answer}<|endofchunk|>")
ID_CHOICE = PromptTemplate(
    demo="<image>{hint}\nQuestion: {question}\nOptions:\n{options}\nAnswer: {answer}\n",
    query="<image>{hint}\nQuestion: {question}\nOptions:\n{options}\nAnswer:",
)
CAPTION_STOP = ["<|endofchunk|>", "Output", "\n"]
VQA_STOP = ["<|endofchunk|>", "Question", "\n"]


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    if spec.adapter not in ADAPTERS:
        raise ConfigError(f"task {spec.name}.adapter", f"is {spec.adapter!r}", f"choose one of {sorted(ADAPTERS)}")
    if spec.name in TASKS and not overwrite:
        raise ConfigError(f"task {spec.name}", "is already registered", "pick another name or pass overwrite=True")
    TASKS[spec.name] = spec
    return spec


def list_tasks() -> dict[str, str]:
    return {name: spec.description for name, spec in sorted(TASKS.items())}


def _vqa(name: str, files: dict, source: str, description: str) -> TaskSpec:
    return TaskSpec(
        name=name, adapter="vqa", templates={"openflamingo": OF_VQA, "idefics": ID_VQA}, metric="vqa_accuracy",
        postprocess="vqa", files=files, max_new_tokens=5, num_beams=3, stop=VQA_STOP, source=source,
        description=description,
    )


def _register_builtin() -> None:
    caption = dict(adapter="karpathy", templates={"openflamingo": OF_CAPTION, "idefics": ID_CAPTION},
                   metric="cider", postprocess="caption", max_new_tokens=20, num_beams=3, stop=CAPTION_STOP)
    register_task(TaskSpec(
        name="coco", files={"annotations": "dataset_coco.json"}, source="Karpathy splits: dataset_coco.json; "
        "images from cocodataset.org (train2014/, val2014/)", description="COCO captioning (Karpathy test), CIDEr",
        **caption))
    register_task(TaskSpec(
        name="flickr30k", files={"annotations": "dataset_flickr30k.json"}, source="Karpathy splits: "
        "dataset_flickr30k.json; images from the Flickr30k release", description="Flickr30k captioning, CIDEr",
        **caption))
    register_task(_vqa("vqav2", {
        "train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
        "train_annotations": "v2_mscoco_train2014_annotations.json",
        "train_images": "train2014/COCO_train2014_{image_id:012d}.jpg",
        "test_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
        "test_annotations": "v2_mscoco_val2014_annotations.json",
        "test_images": "val2014/COCO_val2014_{image_id:012d}.jpg",
    }, "VQAv2 questions/annotations from visualqa.org; images from cocodataset.org", "VQAv2 (val), VQA accuracy"))
    register_task(_vqa("okvqa", {
        "train_questions": "OpenEnded_mscoco_train2014_questions.json",
        "train_annotations": "mscoco_train2014_annotations.json",
        "train_images": "train2014/COCO_train2014_{image_id:012d}.jpg",
        "test_questions": "OpenEnded_mscoco_val2014_questions.json",
        "test_annotations": "mscoco_val2014_annotations.json",
        "test_images": "val2014/COCO_val2014_{image_id:012d}.jpg",
    }, "OK-VQA files from okvqa.allenai.org; images from cocodataset.org", "OK-VQA (val), VQA accuracy"))
    register_task(_vqa("textvqa", {
        "train_questions": "TextVQA_0.5.1_train.json", "train_images": "train_images/{image_id}.jpg",
        "test_questions": "TextVQA_0.5.1_val.json", "test_images": "train_images/{image_id}.jpg",
    }, "TextVQA_0.5.1_*.json and train_val_images from textvqa.org", "TextVQA (val), VQA accuracy"))
    register_task(_vqa("vizwiz", {
        "train_questions": "train.json", "train_images": "train/{image_id}",
        "test_questions": "val.json", "test_images": "val/{image_id}",
    }, "VizWiz annotations (train.json, val.json) and images from vizwiz.org", "VizWiz (val), VQA accuracy"))
    register_task(TaskSpec(
        name="hateful_memes", adapter="hateful_memes", request="rank", metric="roc_auc", positive="yes",
        templates={"openflamingo": PromptTemplate(
            demo="<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>"),
            "idefics": PromptTemplate(demo="<image>is an image with: '{ocr}' written on it. Is it hateful? Answer: {answer}\n",
                                      query="<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:",
                                      continuation=" {candidate}")},
        files={"train": "train.jsonl", "test": "dev_seen.jsonl"},
        source="the Hateful Memes challenge release (train.jsonl, dev_seen.jsonl, img/)",
        description="Hateful Memes (dev_seen), ROC-AUC of p(yes)"))
    register_task(TaskSpec(
        name="imagenet", adapter="imagefolder", request="rank", metric="accuracy", rank_reduce="mean",
        templates={"openflamingo": PromptTemplate(demo="<image>Output:{class_name}<|endofchunk|>", answer_field="class_name"),
                   "idefics": PromptTemplate(demo="<image>Category: {class_name}\n", query="<image>Category:",
                                             continuation=" {candidate}", answer_field="class_name")},
        files={"train": "train", "test": "val"}, source="ImageNet-1k train/ and val/ arranged as class folders",
        description="ImageNet-style classification, top-1 by mean class-name log-prob"))
    choice = dict(templates={"openflamingo": OF_CHOICE, "idefics": ID_CHOICE}, postprocess="choice",
                  max_new_tokens=5, stop=VQA_STOP)
    register_task(TaskSpec(
        name="scienceqa", adapter="scienceqa", metric="choice_accuracy", files={"problems": "problems.json"},
        demo_split="train", eval_split="test", source="ScienceQA problems.json and images/ from scienceqa.github.io",
        description="ScienceQA-IMG (test), accuracy", **choice))
    register_task(TaskSpec(
        name="mmbench", adapter="mmbench", metric="circular", files={"dev": "mmbench_dev_20230712.tsv"},
        demo_split="dev", eval_split="dev", source="MMBench TSV (mmbench_dev_20230712.tsv) from opencompass",
        description="MMBench (dev), CircularEval accuracy", **choice))
    register_task(TaskSpec(
        name="mme", adapter="mme", metric="mme", postprocess="yes_no", files={"test": "MME_Benchmark"},
        demo_split="test", eval_split="test", templates={"openflamingo": OF_VQA, "idefics": ID_VQA},
        max_new_tokens=3, stop=VQA_STOP, source="the MME_Benchmark release folder",
        description="MME perception / cognition scores"))
    register_task(TaskSpec(
        name="mmmu", adapter="mmmu", metric="choice_accuracy", postprocess="choice",
        files={"validation": "mmmu_validation.jsonl", "dev": "mmmu_dev.jsonl"}, demo_split="dev",
        eval_split="validation", max_new_tokens=5, stop=VQA_STOP,
        templates={"openflamingo": PromptTemplate(demo="{question}\n{options}\nAnswer:{answer}<|endofchunk|>"),
                   "idefics": PromptTemplate(demo="{question}\n{options}\nAnswer: {answer}\n",
                                             query="{question}\n{options}\nAnswer:")},
        source="MMMU (exported from its parquet files to JSON lines with image_k as base64 or paths)",
        description="MMMU (validation), accuracy"))
    synth_vqa_of = PromptTemplate(demo="<image>Question:{question} Short answer:{answer}<|endofchunk|>",
                                  chat_user="<image>\n{question}")
    synth_vqa_id = PromptTemplate(demo="<image>Question: {question} Answer: {answer}\n",
                                  query="<image>Question: {question} Answer:", chat_user="<image>\n{question}")
    synth_cap_of = PromptTemplate(demo="<image>Output:{caption}<|endofchunk|>", answer_field="caption",
                                  chat_user="<image>\n" + CAPTION_PROMPT)
    synth_cap_id = PromptTemplate(demo="<image>Caption: {caption}\n", query="<image>Caption:", answer_field="caption",
                                  chat_user="<image>\n" + CAPTION_PROMPT)
    register_task(TaskSpec(
        name="synth-vqa", adapter="synth_vqa", metric="exact_match", postprocess="vqa",
        templates={"openflamingo": synth_vqa_of, "idefics": synth_vqa_id},
        files={"train": "llava/vqa_train.json", "test": "llava/vqa_heldout.json"}, max_new_tokens=4, stop=VQA_STOP,
        source="interleaf.data.write_corpus(DIR)", description="synthetic held-out VQA, exact match per question type"))
    register_task(TaskSpec(
        name="synth-caption", adapter="synth_caption", metric="cider", postprocess="caption",
        templates={"openflamingo": synth_cap_of, "idefics": synth_cap_id},
        files={"scenes": "scenes.json", "test": "llava/captions_heldout.json"}, max_new_tokens=24,
        stop=CAPTION_STOP, source="interleaf.data.write_corpus(DIR)", description="synthetic held-out captions, CIDEr"))
    register_task(TaskSpec(
        name="synth-fewshot", adapter="synth_fewshot", request="rank", metric="accuracy", rank_reduce="mean",
        templates={"openflamingo": PromptTemplate(demo="<image>this is a {answer}.<|endofchunk|>",
                                                  query="<image>this is a", continuation=" {candidate}"),
                   "idefics": PromptTemplate(demo="<image>this is a {answer}.\n", query="<image>this is a",
                                             continuation=" {candidate}")},
        demo_split="test", eval_split="test", description="synthetic word binding: names defined only by the demos"))


def llava_task(path: str | Path, *, name: str | None = None) -> TaskSpec:
    """A task over one's own LLaVA-format JSON: exact match (and VQA accuracy) on the last answer."""
    p = Path(path).expanduser().resolve()
    return TaskSpec(
        name=name or f"llava:{Path(path).name}", adapter="llava", metric="exact_match", postprocess="vqa",
        templates={"openflamingo": PromptTemplate(
            demo="<image>{history}Question:{question} Short answer:{answer}<|endofchunk|>", chat_user="<image>\n{question}"),
            "idefics": PromptTemplate(demo="<image>{history}Question: {question} Answer: {answer}\n",
                                      query="<image>{history}Question: {question} Answer:")},
        files={"test": str(p), "train": str(p)}, max_new_tokens=16, stop=VQA_STOP,
        description=f"LLaVA-format conversations in {p}",
    )


def load_task_yaml(path: str | Path) -> TaskSpec:
    """A :class:`TaskSpec` from YAML; ``base: NAME`` starts from a registered task."""
    from ...files import read_yaml
    from ...schema import coerce, fields_of, read, reject_unknown, with_context

    p = Path(path)
    data = read_yaml(p, "task", "pass the path of a task YAML, or a registered task's name")
    try:
        if not isinstance(data, dict):
            raise ConfigError("task", f"must be a mapping of task fields, got {type(data).__name__}")
        base = coerce(data.pop("base", None), str | None, "base")
        reject_unknown(data, [*fields_of(TaskSpec), "base"], "")
        if base is not None:
            data = {**dataclasses.asdict(get_task(base)), **data}
        data.setdefault("name", p.stem)
        return read(TaskSpec, data, f"task {data['name']}")
    except ConfigError as e:
        raise with_context(e, "", f" (in {p})") from e


def get_task(name: str) -> TaskSpec:
    """A registered task, a YAML task file, or ``llava:PATH``."""
    if name.startswith("llava:"):
        return llava_task(name.split(":", 1)[1])
    if name.endswith((".yaml", ".yml")):
        return load_task_yaml(name)
    if name not in TASKS:
        raise ConfigError("--task", f"unknown task {name!r}",
                          f"known: {', '.join(sorted(TASKS))}; or a task YAML file, or llava:PATH")
    return TASKS[name]


def load_examples(
    task: TaskSpec, split: str, *, data_dir: str | Path | None = None, images_dir: str | Path | None = None,
    options: dict[str, Any] | None = None, read: dict[str, Path] | None = None,
) -> list[Example]:
    """Read one split of ``task`` from local files. ``read`` collects the files read (key -> path)."""
    ctx = DataContext(task, Path(data_dir or ".").expanduser(), Path(images_dir).expanduser() if images_dir else None,
                      dict(options or {}))
    examples = ADAPTERS[task.adapter](ctx, split)
    if read is not None:
        read.update(ctx.read)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"task {task.name!r}, split {split!r}: example id {dup!r} appears more than once")
    return examples


_register_builtin()

__all__ = [
    "ADAPTERS", "PROMPT_FAMILIES", "TASKS", "DataContext", "Example", "PromptTemplate", "TaskSpec", "get_task",
    "list_tasks", "llava_task", "load_examples", "load_task_yaml", "register_task",
]
