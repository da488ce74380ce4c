"""``results.jsonl``: one typed ``RunRecord`` per finished downstream run, appended and fsynced.

This module is the only one that writes or parses the file. ``append`` adds one record (a line that
reaches the disk before it returns); ``read`` gives the typed records of a study folder, skipping
(and saying why) lines that are torn, corrupt or lack a field, and keeping the later record of a run
that appears twice; ``load`` is the plain-JSON-lines reader (also used for ``invocations.jsonl``)
that repairs a torn last line left by a kill while appending, so the run it belonged to is redone.

Records written before protocols existed have ``mode`` (finetune | frozen) and no ``protocol``:
they read as ``protocol = mode``, ``shots = None``. Keys this module does not know are kept in
``RunRecord.extra`` and written back unchanged by ``to_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histossl.errors import HistosslError
from histossl.io import atomic_write_text

log = logging.getLogger(__name__)
RESULTS_FILE = "results.jsonl"


@dataclass
class RunRecord:
    """One finished downstream run: what ran, on which labels, and what it measured.

    The label budget is either ``label_fraction`` (share of the train split) or ``shots`` (labelled
    images per class); the other is None. ``lr_schedule`` and ``lr`` are None for protocols
    without one (linear, knn); ``test_loss`` is None where the protocol has no loss (knn);
    the test fields are None in a tuning study (``downstream.test: false``).
    """

    method: str
    protocol: str
    seed: int
    label_fraction: float | None = None
    shots: int | None = None
    pretrain_chain: str = "none"
    mode: str | None = None  # the protocol under its pre-protocol name, kept for older readers
    n_labeled: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    epochs: int | None = None
    steps: int | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None  # epochs trained (``epochs`` is the most it could take)
    stopped: str | None = None  # "early" (validation stopped improving), "max" (hit the maximum), "budget" (fixed budget)
    threshold: float | None = None
    test_loss: float | None = None
    test_acc: float | None = None
    test_balanced_acc: float | None = None
    test_macro_f1: float | None = None
    test_auroc: float | None = None
    n_test: int | None = None
    wall_s: float | None = None
    encoder: str | None = None  # the study's name for the encoder (a column of the report)
    run: str | None = None  # downstream/<run folder>: the key of a run
    pretrain_dir: str | None = None
    pretrain_seed: int | None = None
    init: str | None = None
    head: str | None = None
    backbone: str | None = None
    image_size: int | None = None
    select_metric: str | None = None
    n_val: int | None = None
    classes: list[str] | None = None
    confusion_matrix: list[list[int]] | None = None
    test_majority_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    val_balanced_acc: float | None = None
    val_auroc: float | None = None
    config: str | None = None
    labels_per_class: list[int] | None = None  # labelled train images of each class in this run
    chosen: dict[str, Any] | None = None  # hyperparameters picked on validation, e.g. {"C": 0.1} or {"k": 20}
    device: str | None = None
    torch_version: str | None = None
    histossl_version: str | None = None
    data_fingerprint: dict[str, Any] | None = None  # the target's fingerprint when the run was made (``stale.py``)
    status: str | None = None  # "diverged" for a run whose loss left float range (metrics null); None: finished
    diverged: str | None = None  # why it diverged, one line
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read
    read_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)  # the keys a read record had

    def __post_init__(self) -> None:
        if self.mode is None:
            self.mode = self.protocol
        if self.encoder is None:
            self.encoder = self.method or "unknown"
        if self.label_fraction is not None:
            self.label_fraction = float(self.label_fraction)

    @property
    def budget(self) -> tuple[str, float]:
        """``("shots", k)`` or ``("fraction", f)``: the row of the report this run belongs to."""
        return ("shots", float(self.shots)) if self.shots is not None else ("fraction", float(self.label_fraction or 0.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the fields in declaration order, then the unknown keys as read.

        A record read from a file gives back the keys it had (plus ``protocol``), so rewriting an
        older record loses and invents nothing; a new record has every field (the unused budget null).
        """
        skip = {"extra", "read_keys"}
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        if self.read_keys is not None:
            data = {k: v for k, v in data.items() if k in self.read_keys or k == "protocol"}
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """A record from parsed JSON; ``protocol`` falls back to ``mode`` (records before protocols)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "read_keys"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("protocol", data.get("mode"))
        return cls(**values, extra={k: v for k, v in data.items() if k not in known}, read_keys=tuple(data))


# A record that lacks one of these cannot be placed in a table.
REQUIRED = ("method", "seed", "test_acc")


def _missing(data: dict[str, Any]) -> list[str]:
    missing = [name for name in REQUIRED if name not in data]
    if "protocol" not in data and "mode" not in data:
        missing.insert(0, "protocol")
    if data.get("label_fraction") is None and data.get("shots") is None:
        missing.append("label_fraction")
    return missing


def read(out_dir: Path) -> tuple[list[RunRecord], list[str]]:
    """The records of ``OUT/results.jsonl`` and, worded for a reader, what had to be skipped.

    Read-only (the study's own ``load`` repairs a torn line). A line that is not a JSON object, or
    lacks a field the tables need, is skipped; when the same ``run`` appears twice (a run redone
    after a resume) the later record wins, in the position of its last occurrence.
    """
    path = Path(out_dir) / RESULTS_FILE
    problems: list[str] = []
    if not path.is_file():
        return [], problems
    good, bad = parse(path.read_text(encoding="utf-8", errors="replace"))
    problems += [f"{RESULTS_FILE} line {number} {why}; skipped" for number, why in bad]
    by_key: dict[Any, RunRecord] = {}
    for number, data, _ in good:
        where = f"{RESULTS_FILE} line {number}"
        missing = _missing(data)
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}; skipped")
            continue
        try:
            record = RunRecord.from_dict(data)
        except (TypeError, ValueError) as err:
            problems.append(f"{where} is not a run record ({err}); skipped")
            continue
        key = record.run or (record.encoder, record.protocol, record.lr_schedule, record.budget, record.seed, number)
        if key in by_key:
            problems.append(f"{where} repeats run `{key}`; the later record is used")
            del by_key[key]  # re-insert so the order follows the file's last occurrence
        by_key[key] = record
    return list(by_key.values()), problems


def read_dicts(out_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """``read`` as plain dicts (``RunRecord.to_dict``; ``protocol`` is always filled in)."""
    found, problems = read(out_dir)
    return [r.to_dict() for r in found], problems


def finished_runs(path: Path, repair: bool = True) -> set[str]:
    """The ``run`` of every complete record in a results file (repairing a torn last line if ``repair``)."""
    return {r.get("run") for r in load(path, repair=repair) if r.get("run")}


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None  # JSON has no NaN
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def append(path: Path, record: RunRecord | dict) -> None:
    """Append one record as a line; the line reaches the disk before this returns."""
    data = record.to_dict() if isinstance(record, RunRecord) else record
    line = json.dumps(_clean(data), sort_keys=False) + "\n"
    try:
        with open(path, "a+b") as f:  # a torn last line (no newline) must not swallow this record
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise HistosslError(f"cannot append to {path}: {err.strerror}") from None


def parse(text: str) -> tuple[list[tuple[int, dict, str]], list[tuple[int, str]]]:
    """The lines of a results.jsonl text: ([(line number, record, line)], [(line number, why it is bad)])."""
    good, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((number, f"is not valid JSON ({err.msg})"))
            continue
        if not isinstance(record, dict):
            bad.append((number, "is not a JSON object"))
            continue
        good.append((number, record, line))
    return good, bad


def load(path: Path, repair: bool = True) -> list[dict]:
    """All complete JSON lines as dicts; a corrupt line is dropped with a warning (and the file repaired).

    The repair rewrites the good lines exactly as they were, so no key of any record is lost.
    """
    path = Path(path)
    if not path.is_file():
        return []
    good, bad = parse(path.read_text(encoding="utf-8", errors="replace"))
    for number, _ in bad:
        log.warning("%s: line %d is incomplete or corrupt (an interrupted write?); dropped, its run will be redone", path, number)
    if bad and repair:
        atomic_write_text(path, "".join(f"{line}\n" for _, _, line in good))
    return [record for _, record, _ in good]
