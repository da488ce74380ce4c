"""``results.jsonl``: one JSON record per finished downstream run, appended and fsynced.

A kill while appending can leave a truncated last line; ``load`` detects it, warns, and rewrites the
file without it (atomically), so the run it belonged to is simply redone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from histossl.errors import HistosslError
from histossl.io import atomic_write_text

log = logging.getLogger(__name__)


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None  # JSON has no NaN
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def append(path: Path, record: dict) -> None:
    """Append one record as a line; the line reaches the disk before this returns."""
    line = json.dumps(_clean(record), sort_keys=False) + "\n"
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
    """All complete records; a corrupt line is dropped with a warning (and the file repaired)."""
    path = Path(path)
    if not path.is_file():
        return []
    good, bad = parse(path.read_text(encoding="utf-8", errors="replace"))
    for number, _ in bad:
        log.warning("%s: line %d is incomplete or corrupt (an interrupted write?); dropped, its run will be redone", path, number)
    if bad and repair:
        atomic_write_text(path, "".join(f"{line}\n" for _, _, line in good))
    return [record for _, record, _ in good]
