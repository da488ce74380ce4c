"""Train/val/test splits that keep every group (patient) whole, and nested label-fraction and few-shot subsets.

Patches of one patient share stain, scanner and tissue; letting them fall on both sides of a split
inflates test accuracy (the reason the IDC literature splits by patient). The split assigns whole
groups greedily, in a seeded random order, to the split where they bring the per-class counts
closest to the requested fractions. Without groups each image is its own group, which makes the
same procedure a plain stratified split.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from histossl.config import SplitConfig
from histossl.data.sources import SPLIT_NAMES, ImageIndex
from histossl.errors import ConfigError, DataError
from histossl.io import atomic_write_json, atomic_write_text


def make_split(index: ImageIndex, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign every image to ``train``, ``val`` or ``test``, whole groups at a time.

    A manifest's ``split`` column wins over the fractions. Otherwise every class gets at least one
    group in each split (``val`` only if ``val_fraction > 0``), and the split's share of each
    class's images is close to the requested fraction.

    Args:
        index: The data set.
        val_fraction: Share of images for validation, in [0, 1).
        test_fraction: Share of images for testing, in (0, 1).
        seed: Same seed, same split (numpy Generator; no string hashing).

    Returns:
        ``(N,)`` str array of ``train``/``val``/``test``.

    Raises:
        ConfigError: Fractions out of range.
        DataError: A class has too few groups (or images) to appear in every split.
    """
    if index.splits is not None:
        return index.splits.copy()
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"split: need 0 <= val_fraction, 0 < test_fraction, sum < 1; got {val_fraction}, {test_fraction}")
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    group_of, counts = _group_class_counts(index)
    _check_enough_groups(index, counts, fractions)
    assignment = _assign_groups(counts, fractions, index.classes, np.random.default_rng(seed))
    return np.array(SPLIT_NAMES)[assignment[group_of]]


def _group_class_counts(index: ImageIndex) -> tuple[np.ndarray, np.ndarray]:
    """Per image its group number, and per group its image count of each class ``(G, C)``."""
    names, group_of = np.unique(index.groups, return_inverse=True)
    counts = np.zeros((len(names), len(index.classes)), dtype=np.int64)
    np.add.at(counts, (group_of, index.labels), 1)
    return group_of, counts


def _check_enough_groups(index: ImageIndex, counts: np.ndarray, fractions: np.ndarray) -> None:
    needed = int((fractions > 0).sum())
    unit = "groups" if index.has_groups else "images"
    for c, name in enumerate(index.classes):
        have = int((counts[:, c] > 0).sum())
        if have < needed:
            raise DataError(
                f"class {name!r} has {have} {unit} in {index.root}; a split into "
                f"{'/'.join(s for s, f in zip(SPLIT_NAMES, fractions) if f > 0)} needs at least {needed}"
            )


def _assign_groups(
    counts: np.ndarray, fractions: np.ndarray, classes: list[str], rng: np.random.Generator
) -> np.ndarray:
    """Greedy assignment of groups to splits; returns the split number (0, 1, 2) of each group.

    First, rarest class first, each split still missing a class gets the unassigned group holding
    that class that fits it best. Then the other groups, in random order, each go to the split
    where they reduce the squared relative deviation from the target counts most.
    """
    totals = counts.sum(axis=0).astype(np.float64)
    target = fractions[:, None] * totals[None, :]  # (3, C) images wanted per split and class
    assigned = np.zeros_like(target)
    split_of = np.full(len(counts), -1, dtype=np.int64)
    open_splits = fractions > 0
    order = rng.permutation(len(counts))

    def cost_increase(g: int) -> np.ndarray:
        g_counts = counts[g][None, :]
        delta = ((2 * (assigned - target) * g_counts + g_counts**2) / totals**2).sum(axis=1)
        return np.where(open_splits, delta, np.inf)

    def put(g: int, s: int) -> None:
        split_of[g] = s
        assigned[s] += counts[g]

    for c in np.argsort((counts > 0).sum(axis=0), kind="stable"):
        for s in np.flatnonzero(open_splits):
            if assigned[s, c] > 0:
                continue
            candidates = order[(split_of[order] < 0) & (counts[order, c] > 0)]
            if len(candidates) == 0:  # groups holding this class were taken for rarer classes
                raise DataError(f"class {classes[c]!r}: too few groups hold it to place one in every split")
            cand = counts[candidates]
            delta = ((2 * (assigned[s] - target[s]) * cand + cand**2) / totals**2).sum(axis=1)
            put(int(candidates[np.argmin(delta)]), s)  # argmin takes the first tie: seeded order
    for g in order:
        if split_of[g] < 0:
            put(g, int(np.argmin(cost_increase(g))))
    return split_of


def label_subsets(labels: np.ndarray, train_idx: np.ndarray, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """Seeded, stratified, nested subsets of the training images for label-scarce runs.

    One random permutation per class; a fraction takes a prefix of each class's permutation, so
    the 5% subset lies inside the 25% one, which lies inside the 50% one. Each class keeps at
    least one image; 1.0 is every training image.

    Args:
        labels: ``(N,)`` class of every image of the index.
        train_idx: Indices (into the index) of the training images.
        fractions: Label fractions in (0, 1].
        seed: Same seed, same subsets.

    Returns:
        Per fraction, sorted int64 indices into the index.

    Raises:
        ConfigError: A fraction outside (0, 1].
    """
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"downstream.fractions: each fraction must be in (0, 1], got {f}")
    per_class = _class_permutations(labels, train_idx, seed)
    subsets = {}
    for f in fractions:
        # floor(x + 0.5) is monotone in f, which keeps the prefixes nested
        taken = [perm[: max(1, int(np.floor(f * len(perm) + 0.5)))] for perm in per_class]
        subsets[f] = np.sort(np.concatenate(taken)).astype(np.int64)
    return subsets


def _class_permutations(labels: np.ndarray, train_idx: np.ndarray, seed: int) -> list[np.ndarray]:
    """One seeded random order of each class's training images (the classes present, in label order).

    Fractions and shots both take prefixes of these orders, so at one seed every budget's subset is
    nested in the larger ones of its kind, and the same for every method and protocol.
    """
    rng = np.random.default_rng(seed)
    train_idx = np.sort(np.asarray(train_idx, dtype=np.int64))
    train_labels = np.asarray(labels)[train_idx]
    return [rng.permutation(train_idx[train_labels == c]) for c in np.unique(train_labels)]


def shot_subsets(
    labels: np.ndarray, train_idx: np.ndarray, shots: list[int], seed: int, classes: list[str] | None = None
) -> dict[int, np.ndarray]:
    """Few-shot subsets: ``k`` labelled training images of every class, seeded and nested across ``k``.

    The ``k`` images of a class are the first ``k`` of the same per-class order the fractions use.

    Args:
        labels: ``(N,)`` class of every image of the index.
        train_idx: Indices (into the index) of the training images.
        shots: Images per class, each at least 1.
        seed: Same seed, same subsets.
        classes: Class names, for the error message.

    Returns:
        Per ``k``, sorted int64 indices into the index.

    Raises:
        ConfigError: ``k`` below 1, or above the training images of some class.
    """
    per_class = _class_permutations(labels, train_idx, seed)
    present = np.unique(np.asarray(labels)[np.asarray(train_idx, dtype=np.int64)]).tolist()
    by_class = dict(zip(present, per_class))
    every_class = range(len(classes)) if classes is not None else present
    subsets = {}
    for k in shots:
        if k < 1:
            raise ConfigError(f"downstream.shots: each budget must be at least 1, got {k}")
        for c in every_class:
            perm = by_class.get(c, np.empty(0, dtype=np.int64))
            if len(perm) < k:
                name = classes[c] if classes is not None else str(c)
                raise ConfigError(f"downstream.shots: {k} exceeds the {len(perm)} training images of class {name!r}")
        subsets[k] = np.sort(np.concatenate([perm[:k] for perm in per_class])).astype(np.int64)
    return subsets


def labels_per_class(labels: np.ndarray, subset: np.ndarray, n_classes: int) -> list[int]:
    """How many labelled images each class has in ``subset`` (0 for a class it misses)."""
    return np.bincount(np.asarray(labels)[subset], minlength=n_classes).astype(int).tolist()


def save_split(path: Path, index: ImageIndex, split: np.ndarray) -> None:
    """Write the split as CSV ``path,label,group,split`` (paths relative to the index root), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "group", "split"])
    for p, label, group, s in zip(index.paths, index.labels, index.groups, split):
        writer.writerow([p.relative_to(index.root).as_posix(), index.classes[label], group, s])
    atomic_write_text(Path(path), buffer.getvalue())


def load_or_make_split(path: Path, index: ImageIndex, cfg: SplitConfig) -> np.ndarray:
    """Reuse the split saved at ``path`` or make and save one.

    A saved split pins the test set of a study across resumed runs. It must list exactly the
    images of ``index`` with the same labels, and have been made with the same settings (kept in
    ``<path>.json``); otherwise the data or settings changed and reusing it would mix studies.

    Raises:
        DataError: The saved split does not match the data set or the settings.
    """
    path = Path(path)
    settings = {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": cfg.seed}
    if index.splits is not None:
        settings = {"from_manifest": True}
    settings_path = path.with_name(path.name + ".json")
    if path.is_file():
        saved = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if isinstance(saved, dict):
            saved.pop("data", None)  # the data fingerprint the study keeps beside the settings (histossl.stale)
        if saved is not None and saved != settings:
            raise DataError(
                f"{path} was made with other split settings than {settings}; "
                f"delete it (and {settings_path.name}) to make a new split"
            )
        return _read_split(path, index)
    split = make_split(index, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    save_split(path, index, split)
    atomic_write_json(settings_path, settings)
    return split


def _read_split(path: Path, index: ImageIndex) -> np.ndarray:
    # A split without a data fingerprint (histossl.stale sets aside what changed data made) comes from
    # a study whose results cannot be told apart by data: deleting split.csv would reuse its encoders.
    changed = (f"the data set at {index.root} changed since {path} was made, and this study predates data "
               f"fingerprints, so its results cannot be sorted into old and new data; start a new study with another --out")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as err:
        raise DataError(f"cannot read split file {path}: {err}") from None
    saved = {}
    for row in rows:
        if row.get("split") not in SPLIT_NAMES:
            raise DataError(f"{path}: bad split value {row.get('split')!r} for {row.get('path')!r}")
        saved[row.get("path")] = (row.get("label"), row["split"])
    if len(saved) != len(index) or len(rows) != len(index):
        raise DataError(f"{changed} ({len(rows)} images listed, {len(index)} now)")
    split = []
    for p, label in zip(index.paths, index.labels):
        entry = saved.get(p.relative_to(index.root).as_posix())
        if entry is None or entry[0] != index.classes[label]:
            raise DataError(f"{changed} (first difference: {p})")
        split.append(entry[1])
    return np.array(split, dtype=str)
