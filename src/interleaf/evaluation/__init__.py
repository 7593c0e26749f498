"""Evaluation: tasks, metrics, few-shot samplers and the runner.

The metrics are re-exported here; see :mod:`interleaf.evaluation.metrics`.
"""

from interleaf.evaluation.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    VQA_MODES,
    ChoiceExtractor,
    CircularRecord,
    JavaNotFoundError,
    MMERecord,
    caption_scores,
    circular_eval,
    circular_rotations,
    exact_match,
    extract_choice,
    index_to_letter,
    mme_parse_yes_no,
    mme_scores,
    ptb_tokenize,
    roc_auc,
    topk_accuracy,
    vqa_accuracy,
    vqa_normalize,
    vqa_score,
)

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "VQA_MODES",
    "ChoiceExtractor",
    "CircularRecord",
    "JavaNotFoundError",
    "MMERecord",
    "caption_scores",
    "circular_eval",
    "circular_rotations",
    "exact_match",
    "extract_choice",
    "index_to_letter",
    "mme_parse_yes_no",
    "mme_scores",
    "ptb_tokenize",
    "roc_auc",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_normalize",
    "vqa_score",
]
