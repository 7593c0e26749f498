"""Evaluation metrics, each following a published definition (cited in its module).

* :mod:`.vqa`: VQAv2 accuracy (official and always-normalise modes), answer normalisation,
  exact match.
* :mod:`.captioning`: CIDEr-D and BLEU-1..4 through pycocoevalcap and its PTB tokenizer.
* :mod:`.classification`: ROC-AUC (scikit-learn) and top-k accuracy.
* :mod:`.mme`: MME per-subtask accuracy / accuracy+ and perception / cognition totals.
* :mod:`.mmbench`: MMBench CircularEval beside VanillaEval, option rotations.
* :mod:`.choices`: rule-based multiple-choice letter extraction with a failure count.
"""

from interleaf.evaluation.metrics.captioning import (
    JavaNotFoundError,
    caption_scores,
    ptb_tokenize,
)
from interleaf.evaluation.metrics.choices import ChoiceExtractor, extract_choice
from interleaf.evaluation.metrics.classification import roc_auc, topk_accuracy
from interleaf.evaluation.metrics.mmbench import (
    CircularRecord,
    circular_eval,
    circular_rotations,
    index_to_letter,
)
from interleaf.evaluation.metrics.mme import (
    MME_COGNITION,
    MME_PERCEPTION,
    MMERecord,
    mme_parse_yes_no,
    mme_scores,
)
from interleaf.evaluation.metrics.vqa import (
    VQA_MODES,
    exact_match,
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
