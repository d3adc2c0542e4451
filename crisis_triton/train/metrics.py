"""The scores the paper reports for a classifier: accuracy, macro-F1 and weighted F1."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted F1 as scikit-learn computes them (f1_score over the labels
    present in y_true or y_pred; an undefined precision or recall counts as 0)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.union1d(y_true, y_pred)
    f1s, support = [], []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        pred, true = np.sum(y_pred == c), np.sum(y_true == c)
        precision = tp / pred if pred else 0.0
        recall = tp / true if true else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        support.append(true)
    f1 = np.asarray(f1s, dtype=np.float64)
    weights = np.asarray(support, dtype=np.float64)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * weights).sum() / weights.sum()) if weights.sum() else 0.0,
        "posts": int(len(y_true)),
    }
