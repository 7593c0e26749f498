"""Evaluation: tasks, metrics, few-shot samplers and the runner.

    from interleaf.evaluation import evaluate, evaluate_synthetic
    evaluate(model, processor, ["vqav2", "coco"], shots=[0, 4], trials=3, data_dir="/data", out_dir="runs/a")
    evaluate_synthetic(model, processor, "corpus/")  # {"vqa": {"exact_match", "per_qtype"}, "caption": {"CIDEr"}}

The metrics are re-exported here; see :mod:`interleaf.evaluation.metrics`.
"""

from interleaf.evaluation import metrics as _metrics
from interleaf.evaluation.metrics import *  # noqa: F403 (the metrics' public names, listed in their __all__)
from interleaf.evaluation.fewshot import RandomDemos, example_seed, render_chat, render_prompt
from interleaf.evaluation.results import compare_table, load_results, results_table
from interleaf.evaluation.rices import RICESDemos, VisionTowerEncoder, build_rices, image_features
from interleaf.evaluation.runner import evaluate, evaluate_synthetic
from interleaf.evaluation.scoring import generate_batch, score
from interleaf.evaluation.tasks import (
    Example,
    PromptTemplate,
    TaskSpec,
    get_task,
    list_tasks,
    load_examples,
    load_task_yaml,
    register_task,
)

__all__ = [
    "Example",
    "PromptTemplate",
    "RICESDemos",
    "RandomDemos",
    "TaskSpec",
    "VisionTowerEncoder",
    "build_rices",
    "compare_table",
    "evaluate",
    "evaluate_synthetic",
    "example_seed",
    "generate_batch",
    "get_task",
    "image_features",
    "list_tasks",
    "load_examples",
    "load_results",
    "load_task_yaml",
    "register_task",
    "render_chat",
    "render_prompt",
    "results_table",
    "score",
    *_metrics.__all__,
]
