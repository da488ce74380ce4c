"""Does a rerun reproduce a report? One row per encoder, mode and fraction present in both studies:
test balanced accuracy mean +- std over seeds on each side, the difference, and Welch's t-test
p-value (3 seeds a side: a p below 0.05 in one cell of 28 is expected by chance about once).

    python benchmarks/compare_runs.py docs/benchmarks/idc/idc-cpu out/idc-cpu   # markdown on stdout
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import ttest_ind

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from histossl import records  # noqa: E402
from tune_table import cell  # noqa: E402


def cells(folder: str, metric: str) -> dict[tuple, list[float]]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records.load(Path(folder) / "results.jsonl", repair=False):
        if r.get(metric) is not None:
            groups[(r["label_fraction"], r["mode"], r["encoder"])].append(r[metric])
    return groups


def main(before: str, after: str, metric: str = "test_balanced_acc") -> None:
    a, b = cells(before, metric), cells(after, metric)
    print(f"| fraction | mode | encoder | {before} | {after} | difference | Welch p |")
    print("|---|---|---|---|---|---|---|")
    outside = 0
    common = sorted(set(a) & set(b))
    for key in common:
        fraction, mode, encoder = key
        diff = 100 * (np.mean(b[key]) - np.mean(a[key]))
        p = ttest_ind(a[key], b[key], equal_var=False).pvalue if min(len(a[key]), len(b[key])) > 1 else float("nan")
        outside += bool(p < 0.05)
        print(f"| {fraction:g} | {mode} | {encoder} | {cell(a[key], True)} | {cell(b[key], True)} | {diff:+.1f} | {p:.2f} |")
    print(f"\n{len(common)} cells in both; {outside} with p < 0.05; only in {before}: {len(set(a) - set(b))}, only in {after}: {len(set(b) - set(a))}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
