"""Classification metrics of one evaluation, as plain floats (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, log_loss, roc_auc_score


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """Loss, accuracy, balanced accuracy, macro F1, macro one-vs-rest AUROC and the confusion matrix.

    Args:
        logits: (N, C) raw scores.
        labels: (N,) true class indices.
        n_classes: C; classes absent from ``labels`` still get a row in the confusion matrix.

    AUROC is NaN when fewer than two classes are present in ``labels``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = softmax(np.asarray(logits, dtype=np.float64))
    pred = probs.argmax(1)
    classes = list(range(n_classes))
    present = np.unique(labels)
    auroc = math.nan
    if len(present) >= 2:
        if n_classes == 2:
            auroc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            # Macro one-vs-rest over the classes present in this split (sklearn needs every column's class present).
            cols = [c for c in classes if c in set(present.tolist())]
            sub = probs[:, cols] / probs[:, cols].sum(1, keepdims=True)
            remap = {c: i for i, c in enumerate(cols)}
            auroc = float(roc_auc_score([remap[c] for c in labels], sub, multi_class="ovr", average="macro", labels=list(range(len(cols)))))
    return {
        "loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=classes)),
        "acc": float((pred == labels).mean()),
        "balanced_acc": float(balanced_accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=classes, zero_division=0)),
        "auroc": auroc,
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
    }


def majority_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class: a run below it has collapsed."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return float(counts.max() / counts.sum())
