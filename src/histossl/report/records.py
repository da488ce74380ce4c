"""Read what a study left on disk: ``results.jsonl``, pretraining stages and per-epoch ``metrics.csv``.

Everything here tolerates a study that is still running or was killed: a truncated or corrupt line
of ``results.jsonl`` is skipped with a warning, a stage without ``metrics.csv`` is skipped, a
half-written last row of a CSV is ignored.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histossl import records

log = logging.getLogger(__name__)

RESULTS_FILE = records.RESULTS_FILE


@dataclass(frozen=True)
class Problem:
    """Something in the study folder the report had to skip, worded for the reader."""

    message: str


@dataclass
class Stage:
    """One pretraining stage: its ``stage.json`` plus the per-epoch pretext curves.

    Attributes:
        folder: path relative to the study folder, e.g. ``pretrain/simclr_target_1a2b3c``.
        info: the parsed ``stage.json`` (``{}`` when it is missing or unreadable).
        epochs, pretext_loss, pretext_acc: one value per row of ``metrics.csv``; ``None`` where empty.
        embedding_std, effective_rank: the collapse signal of methods without a pretext accuracy
            (``histossl.methods.base.collapse_metrics``), per row; empty for the others.
    """

    folder: str
    info: dict[str, Any]
    epochs: list[float] = field(default_factory=list)
    pretext_loss: list[float | None] = field(default_factory=list)
    pretext_acc: list[float | None] = field(default_factory=list)
    embedding_std: list[float | None] = field(default_factory=list)
    effective_rank: list[float | None] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.info.get("stage") or Path(self.folder).name)

    @property
    def chance(self) -> float | None:
        value = _as_float(self.info.get("pretext_chance"))
        return value if value is not None and math.isfinite(value) else None

    @property
    def best_acc(self) -> float | None:
        values = [a for a in self.pretext_acc if a is not None and math.isfinite(a)]
        return max(values) if values else None


def _as_float(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_records(out_dir: Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The records of ``OUT/results.jsonl`` as plain dicts (``histossl.records.read``), and what was skipped.

    Every dict has ``protocol`` (``mode`` for records written before protocols) and ``encoder``.
    """
    found, messages = records.read_dicts(out_dir)
    problems = [Problem(m) for m in messages]
    for problem in problems:
        log.warning("%s: %s", out_dir, problem.message)
    return found, problems


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """The downstream records of a study folder, skipping (with a logged warning) lines that do not parse."""
    return read_records(out_dir)[0]


def read_metrics_csv(path: Path) -> dict[str, list[float | None]]:
    """Columns of a per-epoch ``metrics.csv`` as lists of floats (``None`` where a value is empty).

    Rows whose ``epoch`` does not parse (a half-written last line) are dropped.
    """
    columns: dict[str, list[float | None]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            names = [n.strip() for n in (reader.fieldnames or [])]
            columns = {name: [] for name in names}
            for row in reader:
                row = {(k or "").strip(): v for k, v in row.items()}
                if _as_float(row.get("epoch")) is None or None in row.values():
                    continue
                for name in names:
                    columns[name].append(_as_float(row.get(name)))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        log.warning("%s: cannot read (%s); skipped", path, err)
        return {}
    return columns


STAGE_FILES = ("stage.json", "metrics.csv")  # a pretraining stage's description and curve
# The same of its first training, kept aside by ``train.pretrain.keep_first_training`` while a stage restored
# from its published copy is trained again.
FIRST_TRAINING = ("stage.first.json", "metrics.first.csv")


def described_by(folder: Path) -> tuple[Path, ...]:
    """A stage's ``STAGE_FILES``; while a stage restored from its published copy is trained again (stopped
    before it ended), its ``FIRST_TRAINING``: they made the encoder its recorded runs read."""
    retraining = not (folder / STAGE_FILES[0]).is_file() and (folder / FIRST_TRAINING[0]).is_file()
    return tuple(folder / name for name in (FIRST_TRAINING if retraining else STAGE_FILES))


def load_stages(out_dir: Path) -> list[Stage]:
    """Every pretraining stage under ``OUT/pretrain`` that has a ``metrics.csv``, sorted by folder name."""
    root = Path(out_dir) / "pretrain"
    stages: list[Stage] = []
    if not root.is_dir():
        return stages
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        stage_json, metrics_path = described_by(folder)
        if not metrics_path.is_file():
            log.info("%s: no metrics.csv yet (still running?); skipped", folder)
            continue
        info: dict[str, Any] = {}
        if stage_json.is_file():
            try:
                loaded = json.loads(stage_json.read_text(encoding="utf-8"))
                info = loaded if isinstance(loaded, dict) else {}
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
                log.warning("%s: cannot read (%s); stage shown without its description", stage_json, err)
        columns = read_metrics_csv(metrics_path)
        stages.append(
            Stage(
                folder=f"pretrain/{folder.name}",
                info=info,
                epochs=[e for e in columns.get("epoch", []) if e is not None],
                pretext_loss=columns.get("pretext_loss", []),
                pretext_acc=columns.get("pretext_acc", []),
                embedding_std=columns.get("embedding_std", []),
                effective_rank=columns.get("effective_rank", []),
            )
        )
    return stages
