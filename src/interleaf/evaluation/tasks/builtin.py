"""The shipped benchmark tasks, as data: one :class:`TaskSpec` per public benchmark.

Tasks of one kind share their settings through the dictionaries below (``**VQA`` is "scored
like VQAv2"); each entry then says only what is its own: the files, where the public dataset
comes from, and its description. The registry (:mod:`interleaf.evaluation.tasks`) registers
every entry of :data:`BUILTIN_TASKS` when it is imported.
"""

from __future__ import annotations

from typing import Any

from .spec import PromptTemplate, TaskSpec

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

# Settings shared by the tasks of one kind.
CAPTION: dict[str, Any] = dict(
    adapter="karpathy", templates={"openflamingo": OF_CAPTION, "idefics": ID_CAPTION}, metric="cider",
    postprocess="caption", max_new_tokens=20, num_beams=3, stop=CAPTION_STOP,
)
VQA: dict[str, Any] = dict(
    adapter="vqa", templates={"openflamingo": OF_VQA, "idefics": ID_VQA}, metric="vqa_accuracy", postprocess="vqa",
    max_new_tokens=5, num_beams=3, stop=VQA_STOP,
)
CHOICE: dict[str, Any] = dict(
    templates={"openflamingo": OF_CHOICE, "idefics": ID_CHOICE}, postprocess="choice", max_new_tokens=5, stop=VQA_STOP,
)
MMMU: dict[str, Any] = dict(
    adapter="mmmu", metric="choice_accuracy", postprocess="choice", demo_split="dev", eval_split="validation",
    max_new_tokens=5, stop=VQA_STOP,
    templates={
        "openflamingo": PromptTemplate(demo="{question}\n{options}\nAnswer:{answer}<|endofchunk|>"),
        "idefics": PromptTemplate(demo="{question}\n{options}\nAnswer: {answer}\n", query="{question}\n{options}\nAnswer:"),
    },
)
_MEME = "<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:"

BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="coco", files={"annotations": "dataset_coco.json"},
        source="Karpathy splits: dataset_coco.json; images from cocodataset.org (train2014/, val2014/)",
        description="COCO captioning (Karpathy test), CIDEr", **CAPTION,
    ),
    TaskSpec(
        name="flickr30k", files={"annotations": "dataset_flickr30k.json"},
        source="Karpathy splits: dataset_flickr30k.json; images from the Flickr30k release",
        description="Flickr30k captioning, CIDEr", **CAPTION,
    ),
    TaskSpec(
        name="vqav2", files={
            "train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
            "train_annotations": "v2_mscoco_train2014_annotations.json",
            "train_images": "train2014/COCO_train2014_{image_id:012d}.jpg",
            "test_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
            "test_annotations": "v2_mscoco_val2014_annotations.json",
            "test_images": "val2014/COCO_val2014_{image_id:012d}.jpg",
        },
        source="VQAv2 questions/annotations from visualqa.org; images from cocodataset.org",
        description="VQAv2 (val), VQA accuracy", **VQA,
    ),
    TaskSpec(
        name="okvqa", files={
            "train_questions": "OpenEnded_mscoco_train2014_questions.json",
            "train_annotations": "mscoco_train2014_annotations.json",
            "train_images": "train2014/COCO_train2014_{image_id:012d}.jpg",
            "test_questions": "OpenEnded_mscoco_val2014_questions.json",
            "test_annotations": "mscoco_val2014_annotations.json",
            "test_images": "val2014/COCO_val2014_{image_id:012d}.jpg",
        },
        source="OK-VQA files from okvqa.allenai.org; images from cocodataset.org",
        description="OK-VQA (val), VQA accuracy", **VQA,
    ),
    TaskSpec(
        name="textvqa", files={
            "train_questions": "TextVQA_0.5.1_train.json", "train_images": "train_images/{image_id}.jpg",
            "test_questions": "TextVQA_0.5.1_val.json", "test_images": "train_images/{image_id}.jpg",
        },
        source="TextVQA_0.5.1_*.json and train_val_images from textvqa.org",
        description="TextVQA (val), VQA accuracy", **VQA,
    ),
    TaskSpec(
        name="vizwiz", files={
            "train_questions": "train.json", "train_images": "train/{image_id}",
            "test_questions": "val.json", "test_images": "val/{image_id}",
        },
        source="VizWiz annotations (train.json, val.json) and images from vizwiz.org",
        description="VizWiz (val), VQA accuracy", **VQA,
    ),
    TaskSpec(
        name="hateful_memes", adapter="hateful_memes", request="rank", metric="roc_auc", positive="yes",
        templates={
            "openflamingo": PromptTemplate(demo=_MEME + "{answer}<|endofchunk|>"),
            "idefics": PromptTemplate(demo=_MEME + " {answer}\n", query=_MEME, continuation=" {candidate}"),
        },
        files={"train": "train.jsonl", "test": "dev_seen.jsonl"},
        source="the Hateful Memes challenge release (train.jsonl, dev_seen.jsonl, img/)",
        description="Hateful Memes (dev_seen), ROC-AUC of p(yes)",
    ),
    TaskSpec(
        name="imagenet", adapter="imagefolder", request="rank", metric="accuracy", rank_reduce="mean",
        templates={
            "openflamingo": PromptTemplate(demo="<image>Output:{class_name}<|endofchunk|>", answer_field="class_name"),
            "idefics": PromptTemplate(demo="<image>Category: {class_name}\n", query="<image>Category:",
                                      continuation=" {candidate}", answer_field="class_name"),
        },
        files={"train": "train", "test": "val"}, source="ImageNet-1k train/ and val/ arranged as class folders",
        description="ImageNet-style classification, top-1 by mean class-name log-prob",
    ),
    TaskSpec(
        name="scienceqa", adapter="scienceqa", metric="choice_accuracy", files={"problems": "problems.json"},
        demo_split="train", eval_split="test", source="ScienceQA problems.json and images/ from scienceqa.github.io",
        description="ScienceQA-IMG (test), accuracy", **CHOICE,
    ),
    TaskSpec(
        name="mmbench", adapter="mmbench", metric="circular", files={"dev": "mmbench_dev_20230712.tsv"},
        demo_split="dev", eval_split="dev", source="MMBench TSV (mmbench_dev_20230712.tsv) from opencompass",
        description="MMBench (dev), CircularEval accuracy", **CHOICE,
    ),
    TaskSpec(
        name="mme", adapter="mme", metric="mme", postprocess="yes_no", files={"test": "MME_Benchmark"},
        demo_split="test", eval_split="test", templates={"openflamingo": OF_VQA, "idefics": ID_VQA},
        max_new_tokens=3, stop=VQA_STOP, source="the MME_Benchmark release folder",
        description="MME perception / cognition scores",
    ),
    TaskSpec(
        name="mmmu", files={"validation": "mmmu_validation.jsonl", "dev": "mmmu_dev.jsonl"}, **MMMU,
        source="MMMU (exported from its parquet files to JSON lines with image_k as base64 or paths)",
        description="MMMU (validation), accuracy",
    ),
    TaskSpec(
        name="mmmu-parquet", files={"validation": "*/validation-*.parquet", "dev": "*/dev-*.parquet"}, **MMMU,
        source="MMMU/MMMU on the hub: its parquet files as downloaded, one folder per subject",
        description="MMMU (validation) from its parquet files, accuracy",
    ),
)
