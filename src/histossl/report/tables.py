"""Group downstream records into table cells (mean ± sample std over seeds) and lay out the tables.

A table is one protocol with one lr schedule (or none, for protocols without one such as linear and
knn): rows are label budgets (shots per class, then fractions), columns are encoders (the record's
``encoder`` field). Supervised baselines train the whole network whatever the protocol, so they
appear as a column of every table; in another protocol's table they are marked "(end to end)".
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from histossl.report.document import Cell, Table

MISSING = "—"
FLAG_MARK = "⚠"
# The report imports no torch, so not the protocol registry: titles of the built-in protocols here,
# any other protocol is shown by its name.
MODE_TITLES = {"finetune": "Fine-tuned encoder", "frozen": "Frozen encoder", "linear": "Linear probe (frozen encoder)",
               "knn": "kNN (frozen encoder)"}
MODE_ORDER = ("finetune", "frozen", "linear", "knn")
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


def format_points(summary: Summary | None, scale: float = 100, digits: int = 1) -> str:
    """The compact form of the benchmark tables: ``37.3 ± 2.8`` (values x ``scale``), ``37.3`` for one value."""
    if summary is None:
        return MISSING
    text = f"{scale * summary.mean:.{digits}f}"
    return text + (f" ± {scale * summary.std:.{digits}f}" if summary.std is not None else "")


def format_loss_accuracy(losses: Sequence[float], accuracies: Sequence[float]) -> str:
    """The contract's cell: ``0.3881 / 84.51%``, or ``0.3881 ± 0.0123 / 84.51% ± 1.20%`` over seeds."""
    loss, acc = summarize(losses), summarize(accuracies)
    if loss is None and acc is None:
        return MISSING
    return f"{format_summary(loss)} / {format_summary(acc, percent=True)}"


def format_fraction(fraction: float) -> str:
    """``0.05`` → ``5%``, ``1.0`` → ``100%``, ``0.005`` → ``0.5%``."""
    return f"{100 * fraction:.4g}%"


class Budget(NamedTuple):
    """A label budget, a row of the tables: ``("fraction", 0.05)`` or ``("shots", 5)``. Shots sort first."""

    kind: str  # "shots" | "fraction"
    value: float

    @classmethod
    def of(cls, record: dict[str, Any]) -> Budget:
        if record.get("shots") is not None:
            return cls("shots", float(record["shots"]))
        return cls("fraction", float(record["label_fraction"]))

    @property
    def order(self) -> tuple[int, float]:
        return (0 if self.kind == "shots" else 1, self.value)


def format_budget(budget: Budget) -> str:
    """``5%`` for a fraction, ``1 shot`` / ``5 shots`` (labelled images per class) for shots."""
    if budget.kind == "shots":
        return f"{budget.value:g} shot{'' if budget.value == 1 else 's'}"
    return format_fraction(budget.value)


class CellKey(NamedTuple):
    """Where a record goes: protocol, lr schedule (None for protocols without one), budget, encoder."""

    protocol: str
    schedule: str | None
    budget: Budget
    encoder: str


def is_supervised(record: dict[str, Any]) -> bool:
    return record.get("method") == "supervised"


def _by_seed(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(runs, key=lambda r: (str(r.get("seed")), str(r.get("run"))))


@dataclass
class Aggregate:
    """Records grouped by ``CellKey``, plus the axes of the tables.

    ``modes`` are the protocols present (the name predates protocols), ``schedules`` the lr
    schedules present (None is not listed), ``budgets`` the rows.
    """

    cells: dict[CellKey, list[dict[str, Any]]]
    modes: list[str]
    schedules: list[str]
    budgets: list[Budget]
    encoders: list[str]  # self-supervised first, then supervised baselines; each group sorted
    supervised: set[str] = field(default_factory=set)

    @property
    def protocols(self) -> list[str]:
        return self.modes

    @property
    def fractions(self) -> list[float]:
        return [b.value for b in self.budgets if b.kind == "fraction"]

    def runs(self, mode: str, schedule: str | None, budget: Budget | float, encoder: str) -> list[dict[str, Any]]:
        """The records behind one table cell, sorted by seed.

        A supervised baseline has no frozen variant: in another protocol's table its cell falls back
        to its own (end-to-end) runs with the same schedule (the first schedule for protocols without
        one) and budget.
        """
        budget = budget if isinstance(budget, Budget) else Budget("fraction", float(budget))
        found = self.cells.get(CellKey(mode, schedule, budget, encoder), [])
        if not found and encoder in self.supervised:
            for other in self.modes:
                for other_schedule in [schedule] if schedule is not None else self.schedules:
                    found = self.cells.get(CellKey(other, other_schedule, budget, encoder), [])
                    if found:
                        return _by_seed(found)
        return _by_seed(found)

    def end_to_end(self, mode: str, encoder: str) -> bool:
        """Whether a supervised column in this protocol's table shows runs of another protocol."""
        return encoder in self.supervised and not any(k.protocol == mode and k.encoder == encoder for k in self.cells)

    def columns(self, mode: str, schedule: str | None) -> list[str]:
        own = {k.encoder for k in self.cells if k.protocol == mode and k.schedule == schedule}
        return [e for e in self.encoders if e in own or e in self.supervised]

    def tables(self) -> list[tuple[str, str | None]]:
        """(protocol, schedule) pairs with at least one run, in reading order; schedule None where the protocol has none."""
        present = {(k.protocol, k.schedule) for k in self.cells}
        return [(m, s) for m in self.modes for s in [*self.schedules, None] if (m, s) in present]


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def aggregate(records: Iterable[dict[str, Any]]) -> Aggregate:
    """Group records into table cells. Deterministic: the same records give the same tables in any order."""
    cells: dict[CellKey, list[dict[str, Any]]] = {}
    supervised: set[str] = set()
    for record in records:
        schedule = record.get("lr_schedule")
        key = CellKey(str(record.get("protocol") or record["mode"]), None if schedule is None else str(schedule),
                      Budget.of(record), str(record["encoder"]))
        cells.setdefault(key, []).append(record)
        if is_supervised(record):
            supervised.add(key.encoder)
    encoders = {k.encoder for k in cells}
    return Aggregate(
        cells=cells,
        modes=_order((k.protocol for k in cells), MODE_ORDER),
        schedules=_order((k.schedule for k in cells if k.schedule is not None), SCHEDULE_ORDER),
        budgets=sorted({k.budget for k in cells}, key=lambda b: b.order),
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
    schedule: str | None,
    flagged_runs: set[str] = frozenset(),
    suspicious_encoders: set[str] = frozenset(),
) -> Table:
    """One results table; the best mean of each row is bold, a cell holding a flagged run gets ⚠."""
    encoders = agg.columns(mode, schedule)
    header = ["labels"] + [column_header(agg, mode, e, suspicious_encoders) for e in encoders]
    counts = Counter()
    grid: list[tuple[Budget, list[list[dict[str, Any]]]]] = []
    for budget in agg.budgets:
        row_runs = [agg.runs(mode, schedule, budget, e) for e in encoders]
        if any(row_runs):
            grid.append((budget, row_runs))
            counts.update(len(r) for r in row_runs if r)
    usual_n = counts.most_common(1)[0][0] if counts else 0
    rows: list[list[Cell]] = []
    for budget, row_runs in grid:
        means = [summarize(r.get(metric.best_field) for r in runs) for runs in row_runs]
        best = max((m.mean for m in means if m is not None and math.isfinite(m.mean)), default=None)
        row = [Cell(format_budget(budget))]
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
    own = [r for (k, runs) in agg.cells.items() if k.protocol == mode and k.schedule == schedule for r in runs]
    if "test_loss" in metric.fields and own and all(r.get("test_loss") is None for r in own):
        seeds += "; no test loss: this protocol's scores are not probabilities"
    best = "highest mean accuracy" if metric.best_field == "test_acc" else "highest mean"
    title = MODE_TITLES.get(mode, mode) + ("" if schedule is None else f", {schedule} lr schedule")
    caption = f"**{title}** ({seeds}; bold: {best} of the row)"
    key = f"{metric.key}/{mode}" + ("" if schedule is None else f"/{schedule}")
    return Table(header=header, rows=rows, caption=caption, key=key)


def has_metric(agg: Aggregate, metric: MetricTable) -> bool:
    return any(summarize(r.get(metric.best_field) for r in runs) for runs in agg.cells.values())


def runs_table(agg: Aggregate) -> Table:
    """Traceability: for every cell, the seeds and run folders behind it and the encoder's pretraining."""
    header = ["encoder", "mode", "lr schedule", "labels", "seeds", "run folders", "pretrain"]
    rows: list[list[Cell]] = []
    for mode in agg.modes:
        for schedule in [*agg.schedules, None]:
            for encoder in agg.encoders:
                for budget in agg.budgets:
                    runs = _by_seed(agg.cells.get(CellKey(mode, schedule, budget, encoder), []))
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
                        encoder, mode, schedule or MISSING, format_budget(budget), seeds, folders, source)])
    return Table(header=header, rows=rows, key="runs")
