"""What a protocol declares and returns, the registry, and the shared choice on validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from histossl.config import Config
from histossl.metrics import classification_metrics
from histossl.registry import Registry


@dataclass(frozen=True)
class Job:
    """Everything one run of a protocol gets.

    Attributes:
        cfg: The study config (``cfg.downstream`` holds every protocol's settings).
        spec: The run (``train.downstream.RunSpec``): encoder, budget, schedule, seed.
        data: The target (``train.downstream.TargetData``): images, labels, split rows.
        labeled: Row indices of the labelled training subset.
        run_dir: ``OUT/downstream/<run>``, for protocols that write curves or checkpoints.
        features: ``(N, D)`` float32 features of every target image from the feature store,
            for protocols with ``uses_features``; None otherwise.
    """

    cfg: Config
    spec: Any
    data: Any
    labeled: np.ndarray
    run_dir: Path
    features: np.ndarray | None = None


@dataclass
class Fitted:
    """A fitted protocol: scores for any target rows, and what fitting took and chose.

    Attributes:
        logits: Rows of the target -> ``(len(rows), classes)`` scores whose softmax is the class
            probability (logits or log-probabilities).
        lr, epochs, steps, best_epoch, epochs_run, stopped: For protocols that train with an
            optimizer (``epochs`` is the maximum, ``epochs_run`` what was trained); else None.
        chosen: Hyperparameters picked on validation (``{"C": 0.1}``, ``{"k": 20}``); None if none.
    """

    logits: Callable[[np.ndarray], np.ndarray]
    lr: float | None = None
    epochs: int | None = None
    steps: int | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped: str | None = None  # "early", "max" or "budget" (see ``train.downstream.Trained``)
    chosen: dict[str, Any] | None = None


class Protocol:
    """Base of every protocol; subclasses set the axes they need and implement ``fit``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # how the report names it
    uses_lr_schedule: ClassVar[bool] = False  # run once per downstream.lr_schedules entry
    trains_encoder: ClassVar[bool] = False  # the encoder's weights change (no feature store)
    uses_features: ClassVar[bool] = True  # reads the feature store (the frozen encoder's features)
    needs_validation: ClassVar[bool] = True  # chooses on the validation split
    has_loss: ClassVar[bool] = True  # its scores are probabilities a cross-entropy means something for

    def fit(self, job: Job) -> Fitted | None:  # pragma: no cover - abstract
        """Fit on ``job.labeled``; None only on a rank other than 0 of a multi-process fit."""
        raise NotImplementedError


PROTOCOLS: Registry[type[Protocol]] = Registry("protocol")


def select_on_validation(
    candidates: Sequence[Any], val_logits: Callable[[Any], np.ndarray], labels: np.ndarray, n_classes: int, select_metric: str
) -> Any:
    """The candidate whose validation scores are best by ``select_metric`` (the first one on a tie).

    Args:
        candidates: Hyperparameter values, in the order that wins ties.
        val_logits: Candidate -> ``(n_val, classes)`` scores of the validation rows.
        labels: ``(n_val,)`` validation labels.
        select_metric: ``val_loss`` (lowest wins) or ``val_acc`` / ``val_balanced_acc`` / ``val_auroc``.
    """
    name = select_metric.removeprefix("val_")
    sign = -1.0 if name == "loss" else 1.0
    best, best_score = candidates[0], -np.inf
    for candidate in candidates:
        value = _metric(name, val_logits(candidate), labels, n_classes)
        score = sign * (value if np.isfinite(value) else -sign * np.inf)
        if score > best_score:
            best, best_score = candidate, score
    return best


def _metric(name: str, logits: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """One validation metric; accuracy, balanced accuracy and loss in numpy (a grid scores many candidates).

    Same values as ``classification_metrics`` (balanced accuracy: mean recall over the classes present).
    """
    if name == "auroc":
        return classification_metrics(logits, labels, n_classes)["auroc"]
    if name == "loss":
        z = logits - logits.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-np.clip(log_p[np.arange(len(labels)), labels], np.log(1e-12), 0).mean())
    pred = logits.argmax(1)
    if name == "acc":
        return float((pred == labels).mean())
    present = np.unique(labels)
    return float(np.mean([(pred[labels == c] == c).mean() for c in present]))
