"""Classification metrics of one evaluation, as plain floats (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, log_loss, roc_auc_score, roc_curve

from histossl.errors import Diverged


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decisions(logits: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted class per row ``(N,)``: the most probable, or (two classes) class 1 at probability >= threshold."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    return probs.argmax(1) if threshold is None else (probs[:, 1] >= threshold).astype(np.int64)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, n_classes: int, threshold: float | None = None) -> dict:
    """Loss, accuracy, balanced accuracy, macro F1, macro one-vs-rest AUROC and the confusion matrix.

    Args:
        logits: (N, C) raw scores.
        labels: (N,) true class indices.
        n_classes: C; classes absent from ``labels`` still get a row in the confusion matrix.
        threshold: two classes only: predict class 1 when its probability is at least this
            (see ``best_threshold``); None: the most probable class.

    AUROC is NaN when fewer than two classes are present in ``labels``.

    Raises:
        Diverged: Some logits are NaN or +inf, or a row has no finite score.
    """
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    # Weights gone to NaN/inf: no metric means anything (sklearn would raise). A -inf score is a
    # log-probability of 0 (a linear probe's log-probabilities can underflow): fine while a row has a finite one.
    broken = np.isnan(logits).any(1) | np.isposinf(logits).any(1) | ~np.isfinite(logits).any(1)
    if broken.any():
        raise Diverged(f"{int(broken.sum())} of {len(logits)} outputs are not finite")
    logits = np.maximum(logits, np.log(np.finfo(np.float64).tiny))  # -inf -> the smallest log-probability
    probs = softmax(logits)
    pred = decisions(logits, threshold)
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


def best_threshold(logits: np.ndarray, labels: np.ndarray) -> float:
    """The probability threshold for class 1 that maximises balanced accuracy on these (validation) data.

    For two classes balanced accuracy is (TPR + TNR) / 2, so the best threshold is the ROC point
    with the largest Youden index TPR - FPR. Returns 0.5 when ``labels`` hold a single class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        return 0.5
    p1 = softmax(np.asarray(logits, dtype=np.float64))[:, 1]
    fpr, tpr, thresholds = roc_curve(labels, p1)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf (predict nothing)
