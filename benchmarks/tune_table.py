"""Validation-only comparison of tuning studies (``downstream.test: false``): one row per study folder,
encoder and mode, mean +- std over seeds of the selected checkpoint's validation metrics.

    python benchmarks/tune_table.py out/tune/*        # markdown table on stdout
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histossl import records  # noqa: E402


def cell(values: list[float], percent: bool) -> str:
    scale = 100 if percent else 1
    v = np.asarray(values, dtype=float) * scale
    spread = f" ± {v.std(ddof=1):.{1 if percent else 3}f}" if len(v) > 1 else ""
    return f"{v.mean():.{1 if percent else 3}f}{spread}"


def main(folders: list[str]) -> None:
    print("| study | encoder | mode | fraction | seeds | val balanced acc (%) | val AUROC | test evaluated |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in folders:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in records.load(Path(folder) / "results.jsonl"):
            groups[(r["encoder"], r["mode"], r["label_fraction"])].append(r)
        for (encoder, mode, fraction), runs in sorted(groups.items()):
            tested = "yes" if any(r.get("test_acc") is not None for r in runs) else "no"
            print(
                f"| {Path(folder).name} | {encoder} | {mode} | {fraction:g} | {len(runs)} | "
                f"{cell([r['val_balanced_acc'] for r in runs], True)} | {cell([r['val_auroc'] for r in runs], False)} | {tested} |"
            )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
