"""Validation-only comparison of tuning studies (``downstream.test: false``): one row per study folder,
encoder, protocol and label budget, mean +- std over seeds of the selected weights' validation metrics,
and how the runs ended (how many hit their maximum of epochs while still improving).

With ``--base FOLDER``, each other study's cells that the base also has get its difference to the
base's mean (validation balanced accuracy, points) and the tuning rule's word: ``better`` only when
the variant's mean is above the base's by more than the variant's own seed spread (its std), ``worse``
when below by more than that, else ``tie`` (a tie keeps the base's value).

    python benchmarks/tune_table.py out/tune/*                          # markdown table on stdout
    python benchmarks/tune_table.py --base out/tune/base out/tune/*     # with the comparison to base
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histossl import records  # noqa: E402
from histossl.report import tables  # noqa: E402


def cell(values: list[float | None], percent: bool) -> str:
    return tables.format_points(tables.summarize(values), 100 if percent else 1, 1 if percent else 3)


def budget(record: records.RunRecord) -> str:
    kind, value = record.budget
    return f"{value:g} shots" if kind == "shots" else f"{value:g}"


def ended(runs: list[records.RunRecord]) -> str:
    """E.g. ``early 3`` or ``early 2, max 1``; ``-`` where the protocol has no epochs (linear, knn)."""
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        if r.stopped:
            counts[r.stopped] += 1
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-"


def against(runs: list[records.RunRecord], base: list[records.RunRecord] | None) -> str:
    """``+1.2 (better)``, ``-0.3 (tie)``: the difference to the base's mean and the rule's word."""
    mine, theirs = tables.summarize([r.val_balanced_acc for r in runs]), tables.summarize([r.val_balanced_acc for r in base or []])
    if mine is None or theirs is None:
        return "-"
    diff, spread = mine.mean - theirs.mean, mine.std or 0.0
    word = "better" if diff > spread else "worse" if diff < -spread else "tie"
    return f"{100 * diff:+.1f} ({word})"


def cells(folder: Path) -> dict[tuple, list[records.RunRecord]]:
    found, problems = records.read(folder)
    for problem in problems:
        print(f"{folder}: {problem}", file=sys.stderr)
    groups: dict[tuple, list[records.RunRecord]] = defaultdict(list)
    for r in found:
        groups[(r.encoder, r.protocol, r.budget)].append(r)
    return groups


def main(folders: list[Path], base: Path | None = None) -> None:
    base_cells = cells(base) if base else {}
    extra = " vs base (points) |" if base else ""
    print(f"| study | encoder | protocol | budget | seeds | val balanced acc (%) | val AUROC | ended | test evaluated |{extra}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if base else ""))
    for folder in folders:
        is_base = base is not None and folder.resolve() == base.resolve()
        for (encoder, protocol, key), runs in sorted(cells(folder).items()):
            tested = "yes" if any(r.test_acc is not None for r in runs) else "no"
            compared = "" if not base else " base |" if is_base else f" {against(runs, base_cells.get((encoder, protocol, key)))} |"
            print(
                f"| {folder.name} | {encoder} | {protocol} | {budget(runs[0])} | {len(runs)} | "
                f"{cell([r.val_balanced_acc for r in runs], True)} | {cell([r.val_auroc for r in runs], False)} | "
                f"{ended(runs)} | {tested} |{compared}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="tuning study folders")
    parser.add_argument("--base", type=Path, help="the study the others are variants of")
    args = parser.parse_args()
    main(args.folders, args.base)
