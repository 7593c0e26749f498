"""Classification metrics: ROC-AUC (scikit-learn) and top-k accuracy from per-class scores.

Definitions followed: ROC-AUC is the area under the ROC curve as computed by
``sklearn.metrics.roc_auc_score`` (equal to the probability that a random positive outranks a
random negative, ties counting one half; used for Hateful Memes). Top-k accuracy is the fraction of
rows whose true class is among the k highest-scoring classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from interleaf.errors import InputError


def roc_auc(labels: Sequence[int] | Any, scores: Sequence[float] | Any) -> float:
    """Area under the ROC curve of binary ``labels`` (0/1) ranked by ``scores`` (higher = 1)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise InputError(f"roc_auc: {y.size} labels but {s.size} scores; pass one score per label.")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise InputError(f"roc_auc: labels must be 0 or 1, got values {sorted(values)}.")
    if len(values) < 2:
        raise InputError(
            "roc_auc: needs at least one positive and one negative label; the given labels are all "
            f"{values.pop() if values else 'missing'}. Evaluate on a set holding both classes."
        )
    if not np.isfinite(s).all():
        raise InputError("roc_auc: scores contain NaN or infinity; check the model's outputs.")
    return float(roc_auc_score(y, s))


def topk_accuracy(scores: Any, labels: Sequence[int] | Any, k: int = 1) -> float:
    """Fraction of rows of ``scores`` (N, C) whose true class ``labels[i]`` is among the top ``k``.

    Ties are broken in favour of the lower class index (the order of a stable descending sort), so
    the result is deterministic: class ``y`` ranks after every class with a higher score and after
    every lower-index class with the same score.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if s.ndim != 2:
        raise InputError(f"topk_accuracy: scores must be (N, C), got shape {tuple(s.shape)}.")
    n, c = s.shape
    if y.shape[0] != n or n == 0:
        raise InputError(f"topk_accuracy: {n} score rows but {y.shape[0]} labels (need >= 1 each).")
    if not 1 <= k <= c:
        raise InputError(f"topk_accuracy: k={k} must be between 1 and the number of classes {c}.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= c:
        raise InputError(f"topk_accuracy: labels must be integers in [0, {c}), got {y[:10]}...")
    true_score = s[np.arange(n), y][:, None]  # (N, 1)
    lower_index = np.arange(c)[None, :] < y[:, None]  # (N, C)
    rank = (s > true_score).sum(axis=1) + ((s == true_score) & lower_index).sum(axis=1)  # (N,)
    return float((rank < k).mean())
