"""Group downstream records into table cells (mean ± sample std over seeds) and lay out the tables.

A table is one (mode, lr schedule) pair: rows are label fractions, columns are encoders (the
record's ``encoder`` field). Supervised baselines train the whole network whatever the mode, so
they appear as a column of every table; in a frozen-encoder table they are marked "(end to end)".
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from histossl.report.document import Cell, Table

MISSING = "—"
FLAG_MARK = "⚠"
MODE_TITLES = {"finetune": "Fine-tuned encoder", "frozen": "Frozen encoder"}
MODE_ORDER = ("finetune", "frozen")
SCHEDULE_ORDER = ("cosine", "constant")


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof=1; ``None`` for one value) of one metric in a cell."""

    mean: float
    std: float | None
    n: int


def summarize(values: Iterable[Any]) -> Summary | None:
    """Mean ± sample std of the values that are numbers; ``None`` when there are none."""
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    mean = math.fsum(numbers) / len(numbers)
    std = statistics.stdev(numbers) if len(numbers) > 1 else None
    return Summary(mean, std, len(numbers))


def _number(value: float, percent: bool) -> str:
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def format_summary(summary: Summary | None, percent: bool = False) -> str:
    """``84.51%`` or ``84.51% ± 1.20%`` (percent), ``0.3881`` or ``0.3881 ± 0.0123`` otherwise."""
    if summary is None:
        return MISSING
    text = _number(summary.mean, percent)
    if summary.std is not None:
        text += f" ± {_number(summary.std, percent)}"
    return text


def format_loss_accuracy(losses: Sequence[float], accuracies: Sequence[float]) -> str:
    """The contract's cell: ``0.3881 / 84.51%``, or ``0.3881 ± 0.0123 / 84.51% ± 1.20%`` over seeds."""
    loss, acc = summarize(losses), summarize(accuracies)
    if loss is None and acc is None:
        return MISSING
    return f"{format_summary(loss)} / {format_summary(acc, percent=True)}"


def format_fraction(fraction: float) -> str:
    """``0.05`` → ``5%``, ``1.0`` → ``100%``, ``0.005`` → ``0.5%``."""
    return f"{100 * fraction:.4g}%"


def is_supervised(record: dict[str, Any]) -> bool:
    return record.get("method") == "supervised"


@dataclass
class Aggregate:
    """Records grouped by (mode, lr_schedule, label_fraction, encoder), plus the axes of the tables."""

    cells: dict[tuple[str, str, float, str], list[dict[str, Any]]]
    modes: list[str]
    schedules: list[str]
    fractions: list[float]
    encoders: list[str]  # self-supervised first, then supervised baselines; each group sorted
    supervised: set[str] = field(default_factory=set)

    def runs(self, mode: str, schedule: str, fraction: float, encoder: str) -> list[dict[str, Any]]:
        """The records behind one table cell, sorted by seed.

        A supervised baseline has no frozen variant: in a frozen table its cell falls back to its
        own (end-to-end) runs with the same schedule and fraction.
        """
        found = self.cells.get((mode, schedule, fraction, encoder), [])
        if not found and encoder in self.supervised:
            for other in self.modes:
                found = self.cells.get((other, schedule, fraction, encoder), [])
                if found:
                    break
        return sorted(found, key=lambda r: (str(r.get("seed")), str(r.get("run"))))

    def end_to_end(self, mode: str, encoder: str) -> bool:
        """Whether a supervised column in this mode's table shows runs of another mode."""
        return encoder in self.supervised and not any(k[0] == mode and k[3] == encoder for k in self.cells)

    def columns(self, mode: str, schedule: str) -> list[str]:
        own = {k[3] for k in self.cells if k[0] == mode and k[1] == schedule}
        return [e for e in self.encoders if e in own or e in self.supervised]

    def tables(self) -> list[tuple[str, str]]:
        """(mode, schedule) pairs with at least one run, in reading order."""
        present = {(k[0], k[1]) for k in self.cells}
        return [(m, s) for m in self.modes for s in self.schedules if (m, s) in present]


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def aggregate(records: Iterable[dict[str, Any]]) -> Aggregate:
    """Group records into table cells. Deterministic: the same records give the same tables in any order."""
    cells: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
    supervised: set[str] = set()
    for record in records:
        key = (str(record["mode"]), str(record["lr_schedule"]), float(record["label_fraction"]), str(record["encoder"]))
        cells.setdefault(key, []).append(record)
        if is_supervised(record):
            supervised.add(key[3])
    encoders = {k[3] for k in cells}
    return Aggregate(
        cells=cells,
        modes=_order((k[0] for k in cells), MODE_ORDER),
        schedules=_order((k[1] for k in cells), SCHEDULE_ORDER),
        fractions=sorted({k[2] for k in cells}),
        encoders=sorted(encoders - supervised) + sorted(supervised),
        supervised=supervised,
    )


@dataclass(frozen=True)
class MetricTable:
    """One kind of table: which record fields its cells show and how."""

    key: str
    title: str
    fields: tuple[str, ...]  # the first field that is "higher is better" decides bold
    best_field: str
    formatter: Callable[[list[dict[str, Any]]], str]


def _fmt_single(field_name: str, percent: bool) -> Callable[[list[dict[str, Any]]], str]:
    return lambda runs: format_summary(summarize(r.get(field_name) for r in runs), percent)


METRIC_TABLES = (
    MetricTable(
        "loss_acc",
        "Test loss / test accuracy",
        ("test_loss", "test_acc"),
        "test_acc",
        lambda runs: format_loss_accuracy([r.get("test_loss") for r in runs], [r.get("test_acc") for r in runs]),
    ),
    MetricTable("balanced_acc", "Balanced accuracy", ("test_balanced_acc",), "test_balanced_acc",
                _fmt_single("test_balanced_acc", percent=True)),
    MetricTable("auroc", "AUROC (macro one-vs-rest)", ("test_auroc",), "test_auroc", _fmt_single("test_auroc", False)),
    MetricTable("macro_f1", "Macro F1", ("test_macro_f1",), "test_macro_f1", _fmt_single("test_macro_f1", False)),
)


def column_header(agg: Aggregate, mode: str, encoder: str, suspicious_encoders: set[str]) -> str:
    text = encoder + (" (end to end)" if agg.end_to_end(mode, encoder) else "")
    return f"{text} {FLAG_MARK}" if encoder in suspicious_encoders else text


def build_table(
    agg: Aggregate,
    metric: MetricTable,
    mode: str,
    schedule: str,
    flagged_runs: set[str] = frozenset(),
    suspicious_encoders: set[str] = frozenset(),
) -> Table:
    """One results table; the best mean of each row is bold, a cell holding a flagged run gets ⚠."""
    encoders = agg.columns(mode, schedule)
    header = ["labels"] + [column_header(agg, mode, e, suspicious_encoders) for e in encoders]
    counts = Counter()
    grid: list[tuple[float, list[list[dict[str, Any]]]]] = []
    for fraction in agg.fractions:
        row_runs = [agg.runs(mode, schedule, fraction, e) for e in encoders]
        if any(row_runs):
            grid.append((fraction, row_runs))
            counts.update(len(r) for r in row_runs if r)
    usual_n = counts.most_common(1)[0][0] if counts else 0
    rows: list[list[Cell]] = []
    for fraction, row_runs in grid:
        means = [summarize(r.get(metric.best_field) for r in runs) for runs in row_runs]
        best = max((m.mean for m in means if m is not None and math.isfinite(m.mean)), default=None)
        row = [Cell(format_fraction(fraction))]
        for runs, mean in zip(row_runs, means):
            text = metric.formatter(runs) if runs else MISSING
            if runs and len(runs) != usual_n:
                text += f" (n={len(runs)})"
            if any(r.get("run") in flagged_runs for r in runs):
                text += f" {FLAG_MARK}"
            row.append(Cell(text, bold=best is not None and mean is not None and mean.mean == best))
        rows.append(row)
    seeds = "1 seed per cell" if usual_n == 1 else f"mean ± sample std over {usual_n} seeds per cell"
    if len(counts) > 1:
        seeds += ", other counts marked (n=…)"
    best = "highest mean accuracy" if metric.best_field == "test_acc" else "highest mean"
    caption = f"**{MODE_TITLES.get(mode, mode)}, {schedule} lr schedule** ({seeds}; bold: {best} of the row)"
    return Table(header=header, rows=rows, caption=caption, key=f"{metric.key}/{mode}/{schedule}")


def has_metric(agg: Aggregate, metric: MetricTable) -> bool:
    return any(summarize(r.get(metric.best_field) for r in runs) for runs in agg.cells.values())


def runs_table(agg: Aggregate) -> Table:
    """Traceability: for every cell, the seeds and run folders behind it and the encoder's pretraining."""
    header = ["encoder", "mode", "lr schedule", "labels", "seeds", "run folders", "pretrain"]
    rows: list[list[Cell]] = []
    for mode in agg.modes:
        for schedule in agg.schedules:
            for encoder in agg.encoders:
                for fraction in agg.fractions:
                    runs = sorted(agg.cells.get((mode, schedule, fraction, encoder), []),
                                  key=lambda r: (str(r.get("seed")), str(r.get("run"))))
                    if not runs:
                        continue
                    seeds = ", ".join(str(r.get("seed")) for r in runs)
                    folders = ", ".join(f"`{r.get('run')}`" for r in runs if r.get("run")) or MISSING
                    pretrain = sorted({str(r.get("pretrain_dir")) for r in runs if r.get("pretrain_dir")})
                    chains = sorted({str(r.get("pretrain_chain")) for r in runs if r.get("pretrain_chain")})
                    source = ", ".join(f"`{p}`" for p in pretrain) or "none"
                    if chains:
                        source += " (chain " + ", ".join(f"`{c}`" for c in chains) + ")"
                    rows.append([Cell(c) for c in (
                        encoder, mode, schedule, format_fraction(fraction), seeds, folders, source)])
    return Table(header=header, rows=rows, key="runs")
