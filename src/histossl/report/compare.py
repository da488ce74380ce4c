"""``histossl compare DIR_A DIR_B``: two studies run on the same split and subsets, cell by cell.

For a method change, a rerun or another machine: each cell (label budget, protocol, lr schedule,
encoder) present in both studies, paired by seed (seed s drew the same labelled images in both, which
is why the split and subsets must be identical), gives ``B - A``: the mean difference, its 95%
Student-t interval, the paired t-test's p-value and Holm's correction across the cells. The wording
rule is the verdict's (``report/verdict.py``): "shown" needs two or more paired seeds, Holm p < 0.05
and an interval without zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from histossl import predictions
from histossl.errors import HistosslError
from histossl.report.document import Cell, Table, table_to_markdown
from histossl.report.records import RESULTS_FILE, read_records
from histossl.report.verdict import (
    METRIC,
    PROTOCOL_TITLES,
    Comparison,
    StudyCell,
    budget_label,
    cells_of,
    one_seed_bootstrap,
    schedule_label,
)
from histossl.stats import holm, paired_difference, seeds_needed, t_interval


def check_same_design(dir_a: Path, dir_b: Path) -> str:
    """Raise unless both studies have the same ``split.csv`` (and ``subsets.json`` where present); say what was checked.

    Raises:
        HistosslError: a study lacks ``results.jsonl`` or ``split.csv``, or the files differ.
    """
    for folder in (dir_a, dir_b):
        if not (folder / RESULTS_FILE).is_file():
            raise HistosslError(f"{folder}: no {RESULTS_FILE} (is this a study's output folder?)")
        if not (folder / "split.csv").is_file():
            raise HistosslError(f"{folder / 'split.csv'}: missing; a paired comparison needs both studies' split")
    if (dir_a / "split.csv").read_bytes() != (dir_b / "split.csv").read_bytes():
        raise HistosslError(f"{dir_a / 'split.csv'} and {dir_b / 'split.csv'} differ: the studies did not use the "
                            "same split, so their seeds are not paired")
    subsets = [folder / "subsets.json" for folder in (dir_a, dir_b)]
    present = [p.is_file() for p in subsets]
    if all(present):
        try:
            same = json.loads(subsets[0].read_text(encoding="utf-8")) == json.loads(subsets[1].read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HistosslError(f"cannot read the label subsets ({err})") from err
        if not same:
            raise HistosslError(f"{subsets[0]} and {subsets[1]} differ: seed s drew other labelled images in each "
                                "study, so their seeds are not paired")
        return "split.csv and subsets.json identical"
    if any(present):
        missing = subsets[present.index(False)]
        raise HistosslError(f"{missing}: missing while the other study has one; cannot check that the label subsets match")
    return ("split.csv identical; neither study kept subsets.json, so the label subsets are taken to match "
            "(they are drawn from the split with each seed)")


def compare_studies(dir_a: Path, dir_b: Path, metric: str = METRIC) -> str:
    """The markdown comparison of two study folders (``B - A``, in points of ``metric``).

    Raises:
        HistosslError: see ``check_same_design``.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    checked = check_same_design(dir_a, dir_b)
    cells_a = cells_of(read_records(dir_a)[0], metric)
    cells_b = cells_of(read_records(dir_b)[0], metric)
    common = [k for k in cells_a if k in cells_b]

    def reader(root: Path):
        return lambda run: predictions.read(root / run / predictions.FILE) if run else None

    found = []
    for key in common:
        cell_b, cell_a = cells_b[key], cells_a[key]
        # A Comparison is its first cell minus its second: study B's cell first, for B - A.
        paired = paired_difference(cell_b.values, cell_a.values)
        bootstrap = one_seed_bootstrap(cell_b, cell_a, paired, reader(dir_b), reader(dir_a))
        found.append(Comparison("B vs A", cell_b, cell_a, paired, bootstrap))
    adjusted = holm([c.paired.p_value if c.paired else math.nan for c in found])
    n_tests = sum(math.isfinite(p) for p in adjusted)
    found = [Comparison(c.kind, c.a, c.b, c.paired, c.bootstrap, p, n_tests) for c, p in zip(found, adjusted)]
    rows = [_row(c) for c in found]
    header = ["labels", "protocol", "lr schedule", "encoder", f"A: {dir_a}", f"B: {dir_b}", "B − A (points)",
              "95% CI (points)", "paired seeds", "p (paired t)", "Holm p", "verdict"]
    shown = sum(c.shown for c in found)
    lines = [
        f"# {metric}: B − A, paired by seed",
        "",
        f"A = `{dir_a}`, B = `{dir_b}`; {checked}.",
        "",
        table_to_markdown(Table(header, rows)),
        "",
        f"{len(common)} cells in both; {shown} shown (two or more paired seeds, Holm-adjusted p < 0.05 over "
        f"{n_tests} tests, 95% interval without 0); only in A: {len(set(cells_a) - set(cells_b))}, "
        f"only in B: {len(set(cells_b) - set(cells_a))}.",
    ]
    return "\n".join(lines) + "\n"


def _side(cell: StudyCell) -> str:
    i = t_interval(list(cell.values.values()))
    spread = f" ± {100 * i.std:.2f}" if math.isfinite(i.std) else ""
    return f"{100 * i.mean:.2f}%{spread} (n={i.n})"


def _row(c: Comparison) -> list[Cell]:
    # Comparison's first cell (c.a) is study B's, its second (c.b) study A's: the difference is B - A.
    budget, protocol, schedule, encoder = c.a.key
    d = c.paired.difference if c.paired else None
    if d is not None and d.has_interval:
        interval = f"{100 * d.low:+.1f} to {100 * d.high:+.1f}"
    elif c.bootstrap is not None and c.bootstrap.has_interval:
        interval = f"{100 * c.bootstrap.low:+.1f} to {100 * c.bootstrap.high:+.1f} (test-group bootstrap, 1 seed)"
    else:
        interval = "—"
    verdict = "shown" if c.shown else "not shown"
    if d is not None and not c.shown and c.n >= 2:
        needed = seeds_needed(d.std, d.mean)
        if needed is not None and needed > c.n:
            verdict += f" (~{needed} seeds)" if needed <= 1000 else " (>1000 seeds)"
    p = c.paired.p_value if c.paired else math.nan
    return [Cell(t) for t in (
        budget_label(budget), PROTOCOL_TITLES.get(protocol, protocol), schedule_label(schedule), encoder, _side(c.b), _side(c.a),
        f"{100 * d.mean:+.1f}" if d else "no shared seed", interval, str(c.n),
        f"{p:.2g}" if math.isfinite(p) else "—", f"{c.holm_p:.2g}" if math.isfinite(c.holm_p) else "—", verdict,
    )]
