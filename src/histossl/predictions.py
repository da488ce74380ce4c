"""Per-image test predictions of one downstream run: ``downstream/<run>/test_predictions.csv``.

Columns ``path,group,label,pred`` (class names; ``path`` relative to the data set's root, ``group``
the patient or slide, the path itself for data without groups). The report reads them to put a
bootstrap interval over test groups on a single run (``histossl.stats.group_bootstrap``). Written
by training, read by the report; numpy and the standard library only, so the report needs no torch.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histossl.io import atomic_write_text

log = logging.getLogger(__name__)

FILE = "test_predictions.csv"
COLUMNS = ["path", "group", "label", "pred"]


@dataclass(frozen=True)
class Predictions:
    """One run's test set: per image its path, group, true and predicted class name."""

    paths: np.ndarray
    groups: np.ndarray
    labels: np.ndarray
    preds: np.ndarray


def write(path: Path, paths: list[str], groups: list[str], labels: list[str], preds: list[str]) -> None:
    """Write the file atomically (a killed run leaves no half file)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(zip(paths, groups, labels, preds))
    atomic_write_text(Path(path), buffer.getvalue())


def read(path: Path) -> Predictions | None:
    """The predictions in ``path``, or None (with a logged warning when it exists but is unreadable)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = {name: np.array([row[name] for row in rows], dtype=str) for name in COLUMNS}
    except (OSError, csv.Error, UnicodeDecodeError, KeyError, TypeError) as err:
        log.warning("%s: cannot read (%s); no bootstrap interval for this run", path, err)
        return None
    return Predictions(columns["path"], columns["group"], columns["label"], columns["pred"])
