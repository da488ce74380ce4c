"""Does SSL help here? Paired comparisons of a study's cells and the verdict lines that open its report.

Input: plain record dicts (``encoder``, ``method`` — ``supervised`` marks baselines —, ``protocol``
or, in older records, ``mode``, ``lr_schedule``, ``label_fraction`` or ``shots``, ``seed``,
``test_balanced_acc``). For each label budget, protocol and lr schedule: each encoder against each
supervised baseline, and the best encoder against the second best, paired by seed (seed s draws the
same labelled subset for every method); Holm's correction runs across all of them. A difference is
**shown** only when there are at least two paired seeds, the Holm-adjusted p is below 0.05 and the
95% interval excludes zero: the words follow the interval, never the mean alone.

A single seed has no interval over seeds. Where both runs left ``test_predictions.csv``, the line
quotes a bootstrap over test groups (patients), which covers test-set sampling only, not training
noise, so a single seed is never "shown".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from histossl.predictions import Predictions
from histossl.report.document import Block, Bullets, Cell, Heading, Paragraph, Table
from histossl.stats import Interval, PairedDifference, group_bootstrap, holm, paired_difference, seeds_needed, t_interval

METRIC = "test_balanced_acc"
ALPHA = 0.05
PROTOCOL_TITLES = {"finetune": "fine-tuned", "frozen": "frozen", "linear": "linear probe", "knn": "kNN"}
PROTOCOL_ORDER = ("finetune", "frozen", "linear", "knn")
SUPERVISED, RUNNER_UP = "vs supervised", "best vs second best"

Budget = tuple[str, float]  # ("fraction", 0.05) or ("shots", 10)
CellKey = tuple[Budget, str, str, str]  # (budget, protocol, lr schedule, encoder)
PredictionsOf = Callable[[str], "Predictions | None"]  # a record's ``run`` folder -> its test predictions


def budget_of(record: dict[str, Any]) -> Budget:
    """``("shots", n)`` when the record has shots, else ``("fraction", label_fraction)``."""
    if record.get("shots") is not None:
        return ("shots", float(record["shots"]))
    return ("fraction", float(record["label_fraction"]))


def budget_label(budget: Budget) -> str:
    kind, value = budget
    if kind == "shots":
        return f"{value:g} labelled image{'' if value == 1 else 's'} per class"
    return f"{100 * value:.4g}% labels"


def protocol_of(record: dict[str, Any]) -> str:
    return str(record.get("protocol") or record.get("mode") or "finetune")


@dataclass(frozen=True)
class StudyCell:
    """One cell's metric per seed (the last record wins for a repeated seed) and its run folders per seed."""

    key: CellKey
    values: dict[Any, float]
    runs: dict[Any, str]
    supervised: bool

    @property
    def encoder(self) -> str:
        return self.key[3]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values())))


@dataclass(frozen=True)
class Comparison:
    """``a - b`` (balanced accuracy, fraction units) on the seeds both cells have."""

    kind: str  # SUPERVISED or RUNNER_UP
    a: StudyCell
    b: StudyCell
    paired: PairedDifference | None
    bootstrap: Interval | None = None  # one paired seed: the test-group bootstrap of the difference
    holm_p: float = math.nan
    n_tests: int = 0  # comparisons in Holm's family

    @property
    def n(self) -> int:
        return len(self.paired.seeds) if self.paired else 0

    @property
    def shown(self) -> bool:
        """Two or more paired seeds, Holm-adjusted p below ``ALPHA`` and a 95% interval without zero."""
        return (self.n >= 2 and math.isfinite(self.holm_p) and self.holm_p < ALPHA
                and self.paired is not None and self.paired.difference.excludes_zero())


def cells_of(records: list[dict[str, Any]], metric: str = METRIC) -> dict[CellKey, StudyCell]:
    """The records grouped into cells; records without a finite metric are left out."""
    values: dict[CellKey, dict[Any, float]] = {}
    runs: dict[CellKey, dict[Any, str]] = {}
    supervised: set[CellKey] = set()
    for r in records:
        value = r.get(metric)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if r.get("shots") is None and r.get("label_fraction") is None:  # no budget: no row to put it in
            continue
        key = (budget_of(r), protocol_of(r), str(r.get("lr_schedule")), str(r.get("encoder") or r.get("method")))
        values.setdefault(key, {})[r.get("seed")] = float(value)
        runs.setdefault(key, {})[r.get("seed")] = str(r.get("run") or "")
        if r.get("method") == "supervised":
            supervised.add(key)
    return {k: StudyCell(k, values[k], runs[k], k in supervised) for k in sorted(values, key=_sort_key)}


def _sort_key(key: CellKey) -> tuple:
    (kind, value), protocol, schedule, encoder = key
    order = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
    return (kind != "shots", value, order, protocol, schedule != "cosine", schedule, encoder)  # shots (fewest labels) first


def _baselines(cells: dict[CellKey, StudyCell], budget: Budget, protocol: str, schedule: str) -> list[StudyCell]:
    """Supervised cells for this budget and schedule: of this protocol, else of the first other one.

    A supervised baseline trains the whole network, so a frozen or linear table compares with its
    end-to-end runs, as the report's tables do; a protocol without an lr schedule (linear, knn)
    compares with the baseline's first schedule in table order (cosine before constant).
    """
    supervised = [c for k, c in cells.items() if c.supervised and k[0] == budget]
    found = [c for c in supervised if c.key[2] == schedule]
    if not found and supervised:  # a protocol without an lr schedule (linear, knn): the baseline's first schedule
        first_schedule = supervised[0].key[2]
        found = [c for c in supervised if c.key[2] == first_schedule]
    own = [c for c in found if c.key[1] == protocol]
    if own or not found:
        return own
    first = found[0].key[1]
    return [c for c in found if c.key[1] == first]


def paired_bootstrap(pa: Predictions | None, pb: Predictions | None) -> Interval | None:
    """The test-group bootstrap of ``balanced_acc(a) - balanced_acc(b)`` on the test images both runs predicted."""
    if pa is None or pb is None:
        return None
    where_b = {p: i for i, p in enumerate(pb.paths)}
    common = [(i, where_b[p]) for i, p in enumerate(pa.paths) if p in where_b]
    if not common:
        return None
    ia, ib = np.array(common).T
    return group_bootstrap(pa.labels[ia], pa.preds[ia], pa.groups[ia], other_preds=pb.preds[ib])


def one_seed_bootstrap(a: StudyCell, b: StudyCell, paired: PairedDifference | None,
                       predictions_a: PredictionsOf | None, predictions_b: PredictionsOf | None = None) -> Interval | None:
    """For a single paired seed, the bootstrap of the difference of its two runs (None otherwise or without predictions)."""
    if paired is None or len(paired.seeds) != 1 or predictions_a is None:
        return None
    seed = paired.seeds[0]
    return paired_bootstrap(predictions_a(a.runs.get(seed, "")), (predictions_b or predictions_a)(b.runs.get(seed, "")))


def compare(records: list[dict[str, Any]], predictions: PredictionsOf | None = None, metric: str = METRIC) -> list[Comparison]:
    """Every comparison of the table, with Holm-adjusted p-values across all of them."""
    cells = cells_of(records, metric)
    groups: dict[tuple[Budget, str, str], list[StudyCell]] = {}
    for key, cell in cells.items():
        if not cell.supervised:
            groups.setdefault(key[:3], []).append(cell)
    pairs: list[tuple[str, StudyCell, StudyCell]] = []
    for (budget, protocol, schedule), encoders in groups.items():
        for cell in encoders:
            pairs += [(SUPERVISED, cell, base) for base in _baselines(cells, budget, protocol, schedule)]
        if len(encoders) >= 2:
            best, second = sorted(encoders, key=lambda c: (-c.mean, c.encoder))[:2]
            pairs.append((RUNNER_UP, best, second))
    found = []
    for kind, a, b in pairs:
        paired = paired_difference(a.values, b.values)
        found.append(Comparison(kind, a, b, paired, one_seed_bootstrap(a, b, paired, predictions)))
    adjusted = holm([c.paired.p_value if c.paired else math.nan for c in found])
    n_tests = sum(math.isfinite(p) for p in adjusted)
    return [Comparison(c.kind, c.a, c.b, c.paired, c.bootstrap, p, n_tests) for c, p in zip(found, adjusted)]


def schedule_label(schedule: str) -> str:
    return "—" if schedule == "None" else schedule  # a protocol without an lr schedule (linear, knn)


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _who(cell: StudyCell, several_schedules: bool) -> str:
    _, protocol, schedule, encoder = cell.key
    detail = "supervised, end to end" if cell.supervised else PROTOCOL_TITLES.get(protocol, protocol)
    return f"{encoder} ({detail}{f', {schedule} lr' if several_schedules and schedule != 'None' else ''})"  # linear, knn: no schedule


def describe(c: Comparison, several_schedules: bool = False) -> str:
    """One comparison in words, its conclusion taken from the interval and the Holm-adjusted test."""
    a, b = _who(c.a, several_schedules), c.b.encoder if c.b.supervised else _who(c.b, several_schedules)
    if c.paired is None:
        return f"{a} and {b} share no seed: no paired comparison"
    d = c.paired.difference
    verb = "beats" if d.mean > 0 else "trails" if d.mean < 0 else "ties with"
    head = f"{a} {verb} {b} by {_points(d.mean)} points balanced accuracy"
    if c.n == 1:
        if c.bootstrap is not None and c.bootstrap.has_interval:
            return (f"{head}, 1 seed: no interval over seeds (bootstrap over {c.bootstrap.n} test groups: "
                    f"{_points(c.bootstrap.low)} to {_points(c.bootstrap.high)}, test sampling only): "
                    "not shown (run more seeds)")
        return f"{head}, 1 seed: no interval: not shown (run more seeds)"
    text = f"{head}, 95% CI {_points(d.low)} to {_points(d.high)}, {c.n} paired seeds"
    if not math.isfinite(c.paired.p_value):
        return f"{text}: not shown (the difference is the same for every seed, so there is no spread to test)"
    text += f", Holm-adjusted p = {c.holm_p:.2g}"
    if c.shown:
        return f"{text}: shown"
    if d.excludes_zero():
        return f"{text}: not shown (the interval excludes 0, but not after Holm's correction over {c.n_tests} comparisons)"
    needed = seeds_needed(d.std, d.mean)
    if needed is None:
        return f"{text}: not shown"
    more = f"more than {needed - 1}" if needed > 1000 else f"about {needed}"
    return f"{text}: not shown ({more} paired seeds would be needed to show it)"


def verdict_lines(comparisons: list[Comparison], unbaselined: Iterable[Budget] = ()) -> list[str]:
    """One line per label budget: its best encoder (highest mean) against the strongest supervised baseline.

    ``unbaselined``: budgets with encoder results but no supervised run (``downstream.budgets_of`` can
    leave fine-tuning out of a budget); each gets a line saying so.
    """
    several = len({c.a.key[2] for c in comparisons} - {"None"}) > 1  # "None": a protocol without an lr schedule
    lines = []
    unbaselined = set(unbaselined)
    for budget in sorted({c.a.key[0] for c in comparisons} | unbaselined, key=lambda b: (b[0] != "shots", b[1])):  # fewest labels first
        against = [c for c in comparisons if c.kind == SUPERVISED and c.a.key[0] == budget]
        if not against:
            if budget in unbaselined:
                lines.append(f"{budget_label(budget)}: no supervised run at this budget, no verdict")
            continue
        best = max(against, key=lambda c: (c.a.mean, c.b.mean))  # ties: the first in table order
        lines.append(f"{budget_label(budget)}: {describe(best, several)}")
    return lines


def _share(a: StudyCell, b: StudyCell) -> tuple[str, str]:
    """``a`` as a share of ``b`` (the mean of the per-seed ratios over the seeds both have) and its 95% t interval."""
    seeds = sorted((s for s in set(a.values) & set(b.values) if b.values[s] > 0), key=lambda s: (str(type(s)), s))
    if not seeds:
        share = f"{100 * a.mean / b.mean:.0f}%" if b.mean > 0 else "—"
        return share, "no shared seed, no interval"
    i = t_interval([a.values[s] / b.values[s] for s in seeds])
    if not i.has_interval:
        return f"{100 * i.mean:.0f}%", "1 seed, no interval"
    return f"{100 * i.mean:.0f}%", f"95% CI {100 * i.low:.0f}% to {100 * i.high:.0f}%, {i.n} paired seeds"


def efficiency_line(cells: dict[CellKey, StudyCell]) -> str | None:
    """Label efficiency: the best encoder at the smallest fraction as a share of supervised training with every label.

    The strongest supervised cell at 100% is the reference; the best encoder cell (highest mean) and the
    strongest supervised cell at the smallest fraction are each given as the mean of their per-seed
    ratios to it, with a 95% t interval. None without a supervised run at 100% or an encoder below it.
    """
    full = [c for k, c in cells.items() if c.supervised and k[0] == ("fraction", 1.0)]
    scarce = sorted(k[0] for k, c in cells.items() if k[0][0] == "fraction" and k[0][1] < 1.0 and not c.supervised)
    if not full or not scarce:
        return None
    budget, reference = scarce[0], max(full, key=lambda c: c.mean)
    several = len({k[2] for k in cells} - {"None"}) > 1
    best = max((c for k, c in cells.items() if k[0] == budget and not c.supervised), key=lambda c: c.mean)
    share, detail = _share(best, reference)
    line = (f"Label efficiency: with {budget_label(budget)}, {_who(best, several)} reaches {100 * best.mean:.1f}% balanced "
            f"accuracy, {share} of {reference.encoder} with 100% labels ({100 * reference.mean:.1f}%; {detail})")
    supervised = [c for k, c in cells.items() if k[0] == budget and c.supervised]
    if supervised:
        own = max(supervised, key=lambda c: c.mean)
        share, detail = _share(own, reference)
        line += f"; {own.encoder} with {budget_label(budget)} reaches {100 * own.mean:.1f}%, {share} of it ({detail})"
    return line


def _cell_interval(cell: StudyCell, predictions: PredictionsOf | None) -> str:
    if len(cell.values) >= 2:
        i = t_interval(list(cell.values.values()))
        return f"{100 * i.low:.2f}% to {100 * i.high:.2f}% (t)"
    run = next(iter(cell.runs.values()), "")
    found = predictions(run) if predictions and run else None
    if found is not None:
        i = group_bootstrap(found.labels, found.preds, found.groups)
        if i.has_interval:
            return f"{100 * i.low:.2f}% to {100 * i.high:.2f}% (bootstrap, {i.n} test groups)"
    return "— (1 seed)"


def cell_table(records: list[dict[str, Any]], predictions: PredictionsOf | None = None) -> Table:
    """Per cell: n, mean, std and the 95% interval (Student t over seeds; one seed: test-group bootstrap)."""
    rows = []
    for cell in cells_of(records).values():
        i = t_interval(list(cell.values.values()))
        budget, protocol, schedule, encoder = cell.key
        rows.append([Cell(t) for t in (
            budget_label(budget), PROTOCOL_TITLES.get(protocol, protocol), schedule_label(schedule), encoder, str(i.n),
            f"{100 * i.mean:.2f}%", f"{100 * i.std:.2f}" if math.isfinite(i.std) else "—", _cell_interval(cell, predictions),
        )])
    header = ["labels", "protocol", "lr schedule", "encoder", "seeds", "mean", "std (points)", "95% interval"]
    return Table(header, rows, key="verdict/cells")


def comparison_table(comparisons: list[Comparison]) -> Table:
    rows = []
    for c in comparisons:
        d = c.paired.difference if c.paired else None
        needed = seeds_needed(d.std, d.mean) if d is not None and c.n >= 2 and not c.shown else None
        rows.append([Cell(t) for t in (
            budget_label(c.a.key[0]), PROTOCOL_TITLES.get(c.a.key[1], c.a.key[1]), schedule_label(c.a.key[2]),
            f"{c.a.encoder} − {c.b.encoder}", str(c.n),
            _points(d.mean) if d else "—",
            f"{_points(d.low)} to {_points(d.high)}" if d and d.has_interval else "—",
            f"{c.paired.p_value:.2g}" if c.paired and math.isfinite(c.paired.p_value) else "—",
            f"{c.holm_p:.2g}" if math.isfinite(c.holm_p) else "—",
            "shown" if c.shown else "not shown",
            (f">{needed - 1}" if needed > 1000 else str(needed)) if needed and needed > c.n else "—",
        )])
    header = ["labels", "protocol", "lr schedule", "difference", "paired seeds", "mean (points)", "95% CI (points)",
              "p (paired t)", "Holm p", "verdict", "seeds needed"]
    return Table(header, rows, key="verdict/comparisons")


EXPLANATION = (
    "Balanced accuracy on the test split, in percentage points. Seed s draws the same labelled images for every "
    "method, so each comparison is paired by seed: the mean of the per-seed differences, its 95% Student-t "
    "interval, and the paired t-test's p-value, Holm-corrected across every comparison of the table below. "
    "**Shown** means: two or more paired seeds, Holm-adjusted p < 0.05 and an interval that excludes 0. "
    "*Seeds needed*: the smallest number of paired seeds at which the observed difference, with the observed "
    "spread, would clear its own interval (a rough guide, not a power calculation: at that number a rerun shows it "
    "about half the time). A supervised baseline trains the whole network, so frozen encoders are compared with "
    "its end-to-end runs."
)

EFFICIENCY = (
    " *Label efficiency*: the best encoder at the smallest label fraction as a share of the strongest supervised "
    "baseline with all labels (90% at 5% labels: a twentieth of the labels buys nine tenths of what all of them "
    "do), the mean of the per-seed ratios with its 95% t interval; the same for supervised training at that fraction."
)


def blocks(records: list[dict[str, Any]], predictions: PredictionsOf | None = None) -> list[Block]:
    """The report's verdict section: the lines, how to read them, the comparisons and the per-cell intervals."""
    comparisons = compare(records, predictions)
    by_key = cells_of(records)
    cells = by_key.values()
    baselined = {c.key[0] for c in cells if c.supervised}
    lines = verdict_lines(comparisons, {c.key[0] for c in cells if c.key[0] not in baselined} if baselined else ())
    efficiency = efficiency_line(by_key)
    if not any(c.kind == SUPERVISED for c in comparisons):
        reason = "no supervised baseline" if not any(r.get("method") == "supervised" for r in records) else "nothing to compare"
        return [Heading(2, "Verdict"), Paragraph(f"No verdict: {reason} in these records.")]
    return [
        Heading(2, "Verdict"),
        Bullets(tuple(lines) + ((efficiency,) if efficiency else ())),
        Paragraph(EXPLANATION + (EFFICIENCY if efficiency else "")),
        comparison_table(comparisons),
        Paragraph("Balanced accuracy per cell, with its 95% interval (Student t over seeds; a single seed: bootstrap "
                  "over test groups where the run saved its test predictions):"),
        cell_table(records, predictions),
    ]
