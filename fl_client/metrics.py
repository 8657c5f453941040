"""Site-level evaluation metrics of the diagnostic head (scikit-learn).

Every metric is always present (NaN when undefined, e.g. AUC of a class absent from the split), so
all sites send records with the same keys and the server can aggregate them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, macro and per-class one-vs-rest ROC AUC.

    ``probs`` has shape (n, classes) and rows summing to 1; ``labels`` holds class indices.
    """
    n_classes = len(class_names)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probs must have shape (n, {n_classes}), got {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    metrics: dict[str, float] = {"n": float(len(labels))}
    if len(labels) == 0:
        metrics.update({"loss": math.nan, "accuracy": math.nan, "balanced-accuracy": math.nan, "auc-macro": math.nan})
        metrics.update({f"auc-{name}": math.nan for name in class_names})
        return metrics
    predicted = probs.argmax(axis=1)
    metrics["loss"] = float(log_loss(labels, probs / probs.sum(axis=1, keepdims=True), labels=list(range(n_classes))))
    metrics["accuracy"] = float(accuracy_score(labels, predicted))
    metrics["balanced-accuracy"] = float(balanced_accuracy_score(labels, predicted)) if len(set(labels)) > 1 else math.nan
    aucs = []
    for k, name in enumerate(class_names):
        positives = labels == k
        if positives.all() or not positives.any():
            metrics[f"auc-{name}"] = math.nan
            continue
        auc = float(roc_auc_score(positives, probs[:, k]))
        metrics[f"auc-{name}"] = auc
        aucs.append(auc)
    metrics["auc-macro"] = float(np.mean(aucs)) if len(aucs) >= 2 else math.nan
    return metrics
