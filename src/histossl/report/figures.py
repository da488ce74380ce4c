"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Using ``Figure`` + ``FigureCanvasAgg`` directly instead of ``pyplot`` leaves the caller's
matplotlib backend alone and never leaks open figures. Margins are fixed by hand
(``subplots_adjust``) rather than by the constrained layout engine, which doubles drawing time.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from histossl.report.flags import embedding_collapsed, pretext_left_chance
from histossl.report.records import Stage
from histossl.report.tables import Aggregate, format_fraction, summarize

DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    # No "Software" entry: the same data gives the same bytes whatever matplotlib version drew it.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _finite(xs: list[Any], ys: list[Any]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def pretext_figure(stage: Stage) -> bytes:
    """Pretext loss and (where the task has one) accuracy per epoch, with the chance level."""
    has_acc = any(a is not None for a in stage.pretext_acc)
    has_std = not has_acc and any(v is not None for v in stage.embedding_std)
    two = has_acc or has_std
    fig = Figure(figsize=(8 if two else 4.5, 3.2))
    fig.subplots_adjust(left=0.09 if two else 0.16, right=0.97, bottom=0.16, top=0.82, wspace=0.28)
    axes = fig.subplots(1, 2 if two else 1, squeeze=False)[0]
    x, y = _finite(stage.epochs, stage.pretext_loss)
    axes[0].plot(x, y, marker="o", markersize=3, color="tab:blue")
    axes[0].set(title="pretext loss", xlabel="epoch", ylabel="loss")
    if has_acc:
        x, y = _finite(stage.epochs, stage.pretext_acc)
        axes[1].plot(x, [100 * v for v in y], marker="o", markersize=3, color="tab:blue", label="pretext accuracy")
        if stage.chance is not None:
            axes[1].axhline(100 * stage.chance, color="grey", linestyle="--", label=f"chance ({100 * stage.chance:.2f}%)")
        # The full 0-100% range: zoomed in, noise around chance would look like learning.
        axes[1].set(title="pretext accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
        if pretext_left_chance(stage) is False:
            axes[1].set_title("pretext accuracy: never left chance", color="tab:red")
        axes[1].legend(fontsize=8, loc="center right")
    if has_std:  # methods without a pretext accuracy: the collapse signal (0 = collapsed)
        x, y = _finite(stage.epochs, stage.embedding_std)
        axes[1].plot(x, y, marker="o", markersize=3, color="tab:blue")
        axes[1].set(title="std of normalised embeddings", xlabel="epoch", ylabel="std", ylim=(0, None))
        if embedding_collapsed(stage):
            axes[1].set_title("embeddings collapsed", color="tab:red")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    method = stage.info.get("method", "")
    chain = stage.info.get("chain", "")
    fig.suptitle(f"{stage.name}  ({method}, {chain})", fontsize=10)
    return _png(fig)


def downstream_figure(title: str, curves: list[tuple[str, dict[str, list[float | None]]]]) -> bytes:
    """Train (solid) and validation (dashed) loss and accuracy per epoch; one colour per curve label."""
    fig = Figure(figsize=(11, 3.6))
    fig.subplots_adjust(left=0.07, right=0.76, bottom=0.15, top=0.85, wspace=0.25)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for index, (label, columns) in enumerate(curves):
        color = f"C{index % 10}"
        epochs = columns.get("epoch", [])
        for split, style in (("train", "-"), ("val", "--")):
            x, y = _finite(epochs, columns.get(f"{split}_loss", []))
            ax_loss.plot(x, y, style, color=color, label=f"{label} {split}")
            x, y = _finite(epochs, columns.get(f"{split}_acc", []))
            ax_acc.plot(x, [100 * v for v in y], style, color=color, label=f"{label} {split}")
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=7, title="labels, split\n(train solid, val dashed)", title_fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def accuracy_vs_fraction_figure(agg: Aggregate, schedule: str | None, kind: str = "fraction") -> bytes:
    """Test accuracy and balanced accuracy against the label budget; a line per encoder, a column per protocol.

    ``kind`` is ``fraction`` (x: labelled fraction) or ``shots`` (x: labelled images per class). The
    protocols drawn are those with runs under ``schedule`` and those without an lr schedule. Error
    bars are the sample std over seeds. Dotted grey: the majority-class accuracy (top row) and
    chance 1/classes (bottom row), the levels a collapsed run sits at.
    """
    present = agg.tables()
    modes = [m for m in agg.modes if (m, schedule) in present or (m, None) in present]
    budgets = [b for b in agg.budgets if b.kind == kind]
    scale = 100 if kind == "fraction" else 1
    metrics = (("test_acc", "test accuracy (%)"), ("test_balanced_acc", "balanced accuracy (%)"))
    fig = Figure(figsize=(4.8 * len(modes), 7.0))
    fig.subplots_adjust(left=0.09 if len(modes) > 1 else 0.16, right=0.98, bottom=0.08, top=0.9,
                        wspace=0.22, hspace=0.32)
    grid = fig.subplots(2, len(modes), squeeze=False)
    for col, mode in enumerate(modes):
        mode_schedule = schedule if (mode, schedule) in present else None
        encoders = agg.columns(mode, mode_schedule)
        for row, (field, ylabel) in enumerate(metrics):
            ax = grid[row][col]
            for index, encoder in enumerate(encoders):
                xs, ys, errs = [], [], []
                for budget in budgets:
                    stat = summarize(r.get(field) for r in agg.runs(mode, mode_schedule, budget, encoder))
                    if stat is not None:
                        xs.append(scale * budget.value)
                        ys.append(100 * stat.mean)
                        errs.append(100 * (stat.std or 0.0))
                if not xs:
                    continue
                end_to_end = agg.end_to_end(mode, encoder)
                ax.errorbar(
                    xs, ys, yerr=errs, marker="o", markersize=4, capsize=3, color=f"C{index % 10}",
                    linestyle=":" if end_to_end else "-",
                    label=encoder + (" (end to end)" if end_to_end else ""),
                )
            reference = _reference_level(agg, mode, mode_schedule, field)
            if reference is not None:
                name = "majority class" if field == "test_acc" else "chance"
                ax.axhline(100 * reference, color="grey", linestyle=":", linewidth=1, label=name)
            ax.set_xscale("log")
            ax.set_xticks([scale * b.value for b in budgets],
                          [format_fraction(b.value) if kind == "fraction" else f"{b.value:g}" for b in budgets])
            ax.minorticks_off()
            ax.set(xlabel="labelled fraction of the training set" if kind == "fraction" else "labelled images per class",
                   ylabel=ylabel)
            ax.set_title(f"{mode}, {mode_schedule} lr" if mode_schedule else mode, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    against = "label fraction" if kind == "fraction" else "labelled images per class"
    fig.suptitle(f"Test accuracy against {against} (mean ± std over seeds)", fontsize=11)
    return _png(fig)


def _reference_level(agg: Aggregate, mode: str, schedule: str | None, field: str) -> float | None:
    runs = [r for k, rs in agg.cells.items() if k.protocol == mode and k.schedule == schedule for r in rs]
    if field == "test_acc":
        stat = summarize(r.get("test_majority_acc") for r in runs)
        return stat.mean if stat else None
    sizes = {len(r["classes"]) for r in runs if isinstance(r.get("classes"), list) and r["classes"]}
    return 1.0 / sizes.pop() if len(sizes) == 1 else None


def confusion_figure(record: dict[str, Any], title: str) -> bytes:
    """Counts of the confusion matrix (rows: true class, columns: predicted), coloured by row share."""
    matrix = [[float(v) for v in row] for row in record["confusion_matrix"]]
    n = len(matrix)
    classes = [str(c) for c in (record.get("classes") or [])]
    if len(classes) != n:
        classes = [str(i) for i in range(n)]
    shares = [[v / (sum(row) or 1.0) for v in row] for row in matrix]
    size = max(3.6, 0.6 * n + 2.2)
    fig = Figure(figsize=(size + 1.0, size + 0.4))
    fig.subplots_adjust(left=0.26, right=0.95, bottom=0.24, top=0.86)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i][j]:g}", ha="center", va="center", fontsize=9,
                    color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 4 else 0, ha="right" if max(map(len, classes)) > 4 else "center")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def difference_figure(comparisons: list[Any]) -> bytes:
    """Balanced accuracy minus the supervised baseline's against label budget: a line per encoder, 95% band.

    ``comparisons`` are ``report.verdict.Comparison`` objects of kind "vs supervised"; one panel per
    (budget kind, protocol, lr schedule). The band is the paired 95% t interval over seeds, absent
    where there is one seed (a lone marker then).
    """
    panels: dict[tuple, dict[str, list]] = {}
    for c in comparisons:
        (kind, value), protocol, schedule, encoder = c.a.key
        if c.paired is None:
            continue
        label = encoder if len({x.b.encoder for x in comparisons}) == 1 else f"{encoder} − {c.b.encoder}"
        d = c.paired.difference
        panels.setdefault((kind, protocol, schedule), {}).setdefault(label, []).append((value, d.mean, d.low, d.high))
    keys = sorted(panels, key=lambda k: (k[0] != "fraction", k[1] != "finetune", k[1], k[2]))
    fig = Figure(figsize=(4.8 * max(1, len(keys)), 3.8))
    fig.subplots_adjust(left=0.14 if len(keys) == 1 else 0.08, right=0.98, bottom=0.15, top=0.82, wspace=0.25)
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        kind, protocol, schedule = key
        scale = 100 if kind == "fraction" else 1
        budgets = sorted({v for points in panels[key].values() for v, *_ in points})
        for index, (label, points) in enumerate(sorted(panels[key].items())):
            points.sort()
            xs = [scale * p[0] for p in points]
            color = f"C{index % 10}"
            ax.plot(xs, [100 * p[1] for p in points], marker="o", markersize=4, color=color, label=label)
            band = [(x, p) for x, p in zip(xs, points) if math.isfinite(p[2]) and math.isfinite(p[3])]
            if band:
                ax.fill_between([x for x, _ in band], [100 * p[2] for _, p in band], [100 * p[3] for _, p in band],
                                color=color, alpha=0.15, linewidth=0)
        ax.axhline(0, color="grey", linestyle="--", linewidth=1)
        if len(budgets) > 1 and min(budgets) > 0:
            ax.set_xscale("log")
        ax.set_xticks([scale * b for b in budgets],
                      [format_fraction(b) if kind == "fraction" else f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set(xlabel="labelled fraction of the training set" if kind == "fraction" else "labels per class",
               ylabel="difference (points)")
        ax.set_title(f"{protocol}, {schedule} lr", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Balanced accuracy minus supervised (paired by seed; band: 95% interval)", fontsize=11)
    return _png(fig)
