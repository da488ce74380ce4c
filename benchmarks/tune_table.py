"""Validation-only comparison of tuning studies (``downstream.test: false``): one row per study folder,
encoder, protocol and label budget, mean +- std over seeds of the selected weights' validation metrics,
and how the runs ended (how many hit their maximum of epochs while still improving).

    python benchmarks/tune_table.py out/tune/*        # markdown table on stdout
"""

from __future__ import annotations

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


def main(folders: list[str]) -> None:
    print("| study | encoder | protocol | budget | seeds | val balanced acc (%) | val AUROC | ended | test evaluated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        found, problems = records.read(Path(folder))
        for problem in problems:
            print(f"{folder}: {problem}", file=sys.stderr)
        groups: dict[tuple, list[records.RunRecord]] = defaultdict(list)
        for r in found:
            groups[(r.encoder, r.protocol, r.budget)].append(r)
        for (encoder, protocol, _), runs in sorted(groups.items()):
            tested = "yes" if any(r.test_acc is not None for r in runs) else "no"
            print(
                f"| {Path(folder).name} | {encoder} | {protocol} | {budget(runs[0])} | {len(runs)} | "
                f"{cell([r.val_balanced_acc for r in runs], True)} | {cell([r.val_auroc for r in runs], False)} | "
                f"{ended(runs)} | {tested} |"
            )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
