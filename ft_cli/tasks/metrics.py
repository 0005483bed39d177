"""Classification metrics from a confusion matrix, in numpy.

Written here rather than taken from scikit-learn so that ft does not depend on it at run time (it is large, and
ft needs only these few sums); tests/test_classification.py checks every number against scikit-learn's
`classification_report` / `f1_score` / `confusion_matrix`. Conventions are scikit-learn's: rows are true labels,
columns predicted; a precision or recall whose denominator is 0 is 0 (zero_division=0); micro-F1 over all
classes equals accuracy for single-label classification; weighted-F1 weighs each class by its support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The keys of `classification_metrics` that are one number each (train.best_metric and --fail-if take these).
SCALAR_METRICS = ("accuracy", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro")


def confusion_matrix(true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, num_labels: int) -> np.ndarray:
    """counts[t, p]: examples of true class t predicted as p."""
    t = np.asarray(true, dtype=np.int64)
    p = np.asarray(pred, dtype=np.int64)
    return np.bincount(t * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_metrics(counts: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted F1, macro precision/recall, per-class precision/recall/F1/support and the
    confusion matrix (as nested lists, rows = true labels) from a confusion matrix."""
    counts = np.asarray(counts, dtype=np.int64)
    tp = np.diag(counts).astype(np.float64)
    support = counts.sum(axis=1).astype(np.float64)
    predicted = counts.sum(axis=0).astype(np.float64)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = counts.sum()
    accuracy = float(tp.sum() / total) if total else 0.0
    micro_p = float(tp.sum() / predicted.sum()) if predicted.sum() else 0.0
    micro_r = float(tp.sum() / support.sum()) if support.sum() else 0.0
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    return {
        "accuracy": accuracy,
        "f1_macro": float(f1.mean()),
        "f1_micro": float(micro_f1),
        "f1_weighted": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(labels)},
        "confusion_matrix": {"labels": list(labels), "counts": counts.tolist()},
    }
