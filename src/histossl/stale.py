"""When a data set changes under a study: say what changed, and set aside what was made from the old data.

Every resume fingerprints the study's data sets (``data/fingerprint.py``: paths, sizes and contents) and compares them with the
fingerprints kept in ``split.csv.json``, each ``stage.json`` and each record. What was made from
other data is moved, not deleted, to ``OUT/stale/<time>/`` (same layout), and the study redoes it:
a new split of the target, new pretraining on every changed data set (and the stages built on
those), new downstream runs. Old results are never mixed with new ones in ``results.jsonl`` or the
report. Results without a fingerprint (studies made before fingerprints, such as the committed
ones under ``docs/``) are unknown, not changed: they are kept.

The current fingerprints are written to ``OUT/data.json``; the report names each data set from it.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from pathlib import Path

from histossl import records
from histossl.config import Config, encoder_chain
from histossl.data import fingerprint as fp
from histossl.data.sources import load_index
from histossl.io import atomic_write_text

log = logging.getLogger(__name__)
DATA_FILE = "data.json"
RESULTS = "results.jsonl"


def current(out: Path) -> dict[str, dict]:
    """The fingerprints of this command's data sets (``OUT/data.json``), by data set name; {} before the first."""
    path = Path(out) / DATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def reconcile(cfg: Config, out: Path) -> dict[str, dict]:
    """Fingerprint the data sets, set aside what other data made, write ``OUT/data.json``; returns the fingerprints."""
    from histossl.study import dataset_path

    out = Path(out)
    names = list(dict.fromkeys([cfg.target] + [d for e in cfg.encoders.values() for d in encoder_chain(cfg, e)]))
    prints, listings, before = {}, {}, current(out)
    for name in names:
        index = load_index(dataset_path(cfg, name, out), labels=cfg.datasets[name].labels)
        last = before.get(name)
        known = fp.load_listing(out, name, last["digest"]) if isinstance(last, dict) and "digest" in last else None
        listings[name] = fp.listing(index, known)
        prints[name] = fp.fingerprint(index, listings[name])
        fp.save_listing(out, name, prints[name], listings[name])
    stale = _find_stale(cfg, out, prints)
    if stale["changed"]:
        _set_aside(out, stale, prints, listings)
    atomic_write_text(out / DATA_FILE, json.dumps(prints, indent=2) + "\n", durable=False)  # recomputed by every command
    return prints


def _find_stale(cfg: Config, out: Path, prints: dict[str, dict]) -> dict:
    def differs(saved: dict | None, name: str) -> bool:
        return fp.differs(saved, prints[name], out, name)

    changed: dict[str, dict] = {}  # data set -> the old fingerprint that differs
    split_info = _read_json(out / "split.csv.json")
    split_stale = differs(split_info.get("data"), cfg.target)
    if split_stale:
        changed[cfg.target] = split_info["data"]
    stages: dict[str, dict] = {}
    for folder in sorted((out / "pretrain").glob("*/")) if (out / "pretrain").is_dir() else []:
        info = _read_json(folder / "stage.json") or _read_json(folder / "stage_key.json")
        stages[folder.name] = info
    stale_stages = set()
    for name, info in stages.items():
        dataset = info.get("dataset")
        if dataset in prints and differs(info.get("data"), dataset):
            changed.setdefault(dataset, info["data"])
            stale_stages.add(name)
    for name, info in stages.items():  # unfinished stages (no stage.json) of a changed data set: trained on the old data
        if not (out / "pretrain" / name / "stage.json").is_file() and info.get("dataset") in changed:
            stale_stages.add(name)
        if split_stale and info.get("dataset") == cfg.target:  # trained on the old train split
            stale_stages.add(name)
    grew = True
    while grew:  # a stage started from a stale stage's encoder is stale too
        before = len(stale_stages)
        for name, info in stages.items():
            previous = info.get("init") or ""
            if previous.removeprefix("stage:") in stale_stages or (info.get("previous") or {}).get("stage") in stale_stages:
                stale_stages.add(name)
        grew = len(stale_stages) > before
    stale_runs, kept = [], []
    for record in records.load(out / RESULTS, repair=False):
        made_from = record.get("data_fingerprint")
        if differs(made_from, cfg.target):
            changed.setdefault(cfg.target, made_from)
        if split_stale or differs(made_from, cfg.target) or Path(str(record.get("pretrain_dir") or "")).name in stale_stages:
            stale_runs.append(record)
        else:
            kept.append(record)
    return {"changed": changed, "split": split_stale, "stages": sorted(stale_stages), "runs": stale_runs, "kept": kept,
            "target_changed": cfg.target in changed}


def _set_aside(out: Path, stale: dict, prints: dict[str, dict], listings: dict) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = out / "stale" / when
    dest.mkdir(parents=True, exist_ok=True)

    def move(rel: str) -> None:
        if (out / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out / rel), str(dest / rel))

    what = []
    for name, old in stale["changed"].items():
        what.append(f"data set {name!r} at {prints[name]['path']}: {fp.describe_change(out, name, old, prints[name], listings[name])}")
    kept_runs = {r.get("run") for r in stale["kept"]}
    if stale["target_changed"]:  # the split, the label subsets and the cached features index the old images
        for rel in ("split.csv", "split.csv.json", "subsets.json", "features"):
            move(rel)
        for folder in sorted((out / "downstream").glob("*/")) if (out / "downstream").is_dir() else []:
            if f"downstream/{folder.name}" not in kept_runs:
                move(f"downstream/{folder.name}")
    for stage in stale["stages"]:
        move(f"pretrain/{stage}")
        move(f"features/{stage}.npy")
    for record in stale["runs"]:
        move(str(record.get("run")))
    if stale["runs"]:
        atomic_write_text(dest / RESULTS, "".join(json.dumps(r) + "\n" for r in stale["runs"]))
        atomic_write_text(out / RESULTS, "".join(json.dumps(r) + "\n" for r in stale["kept"]))
    for rel in ("report.md", "report.html"):
        if (out / rel).exists():
            shutil.copy2(out / rel, dest / rel)  # the report of the old data, for comparison; rebuilt at the end
    log.warning(
        "%s; moved what was made from the old data to %s (%s split, %d pretraining stages, %d downstream runs); "
        "they are redone now on the current data",
        "; ".join(what), dest, "the" if stale["target_changed"] else "no", len(stale["stages"]), len(stale["runs"]),
    )
