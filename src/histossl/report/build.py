"""Assemble ``report.md``, ``report.html`` and ``figures/`` from a study folder's records alone.

Everything comes from files the study wrote (``results.jsonl``, ``pretrain/*/stage.json`` and
``metrics.csv``, ``downstream/*/metrics.csv``, the ``name`` in ``config.yaml``), so rebuilding gives
the same report. The markdown holds no timestamp for that reason.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from histossl import predictions, provenance
from histossl.pace import duration
from histossl.data import fingerprint
from histossl.errors import HistosslError
from histossl.io import atomic_write_bytes, atomic_write_text
from histossl.report import figures as draw
from histossl.report import verdict
from histossl.report.document import Block, Bullets, Cell, Figure, Heading, Paragraph, Table, to_markdown
from histossl.report.flags import Flag, find_flags, is_diverged, pretext_left_chance
from histossl.report.html import to_html
from histossl.report.records import Problem, Stage, load_stages, read_metrics_csv, read_records
from histossl.report.tables import (
    FLAG_MARK,
    METRIC_TABLES,
    MODE_TITLES,
    Aggregate,
    CellKey,
    aggregate,
    build_table,
    format_budget,
    format_fraction,
    has_metric,
    runs_table,
)

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
# Figure names this module writes; stale ones from an earlier build are removed, nothing else is.
_OWN_FIGURE = re.compile(r"^(pretext_|downstream_|accuracy_vs_fraction|accuracy_vs_shots|confusion_|difference_to_supervised).*\.png$")


def safe_name(text: str) -> str:
    """A file-name-safe version of an encoder or stage name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "unnamed"


def _study_name(out_dir: Path) -> str:
    path = out_dir / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return out_dir.resolve().name
    if isinstance(config, dict) and isinstance(config.get("name"), str):
        return config["name"]
    return out_dir.resolve().name


def _sum_field(items: list[dict[str, Any]], name: str) -> float:
    return math.fsum(float(v) for i in items if isinstance(v := i.get(name), int | float) and math.isfinite(v))


def _header(out_dir: Path, name: str, records: list[dict[str, Any]], stages: list[Stage], agg: Aggregate) -> list[Block]:
    seeds = sorted({r.get("seed") for r in records}, key=str)
    p_seeds = sorted({r["pretrain_seed"] for r in records if r.get("pretrain_seed") is not None}, key=str)
    pairing = ""
    if len(p_seeds) > 1:  # several pretrainings per encoder: the spread over seeds covers them too
        pairing = (f"; each SSL encoder pretrained once per seed {', '.join(map(str, p_seeds))}, downstream seed i on the "
                   "encoder of pretraining seed i mod n, so ± std covers pretraining as well as downstream seeds")
    # Worded as before protocols when only the two original ones ran, so older reports rebuild unchanged.
    axis = "modes" if set(agg.modes) <= {"finetune", "frozen"} else "protocols"
    if any(b.kind == "shots" for b in agg.budgets):
        budgets = f"label budgets {', '.join(format_budget(b) for b in agg.budgets)}"
    else:
        budgets = f"label fractions {', '.join(format_fraction(f) for f in agg.fractions) or '—'}"
    items = [
        f"Study folder `{out_dir}`; resolved configuration `{out_dir / 'config.yaml'}`",
        *_partial_line(out_dir, records),
        f"**{len(records)} downstream runs**: {len(agg.encoders)} encoders × {axis} "
        f"{', '.join(agg.modes) or '—'} × lr schedules {', '.join(agg.schedules) or '—'} × {budgets}; "
        f"seeds {', '.join(map(str, seeds)) or '—'}{pairing}",
        f"{len(stages)} pretraining stages with curves; compute: {duration(_sum_field([s.info for s in stages], 'wall_s'))}"
        f" pretraining, {duration(_sum_field(records, 'wall_s'))} downstream",
    ]
    for field, label in (("device", "hardware"), ("torch_version", "torch"), ("histossl_version", "histossl")):
        values = sorted({str(r[field]) for r in records if r.get(field)})
        if values:
            items.append(f"{label}: {', '.join(values)}")
    items += _data_lines(out_dir, records)
    thresholds = [r["threshold"] for r in records if isinstance(r.get("threshold"), int | float)]
    if thresholds:
        items.append(f"Decision threshold chosen on the validation split for {len(thresholds)} of {len(records)} runs "
                     f"(probability of class `{_positive_class(records)}`, range {min(thresholds):.2f}-{max(thresholds):.2f}); "
                     "the others predict the most probable class")
    items.append(f"Rebuilt from the records with `histossl report {out_dir}`")
    return [Heading(1, f"histossl study report: {name}"), Bullets(tuple(items))]


def _partial_line(out_dir: Path, records: list[dict[str, Any]]) -> list[str]:
    """A study stopped part-way says so first: how many of the runs its last command planned
    (``plan.json``, written by ``histossl study``) are recorded. Nothing when all are, or without a plan."""
    try:
        planned = json.loads((out_dir / "plan.json").read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    missing = set(planned) - {r.get("run") for r in records}
    if not missing:
        return []
    return [f"**Partial: {len(planned) - len(missing)} of the {len(planned)} planned runs are recorded**, "
            f"{len(missing)} still to run (rerun the study's command to finish them); every table and verdict "
            "below is of the recorded runs only"]


def _data_lines(out_dir: Path, records: list[dict[str, Any]]) -> list[str]:
    """Each data set's path and fingerprint (``OUT/data.json``, written by the last command), and
    whether the records were made from it (their ``data_fingerprint``)."""
    try:
        prints = json.loads((out_dir / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    lines = []
    for name, fp in prints.items() if isinstance(prints, dict) else ():
        if not isinstance(fp, dict):
            continue
        made = [r.get("data_fingerprint") for r in records]
        known = [m for m in made if isinstance(m, dict)]
        note = ""
        if known and name == next(iter(prints)):  # the target: the first data set listed
            same = sum(not fingerprint.differs(m, fp, out_dir, name) for m in known)
            note = f"; {same} of {len(records)} runs were made from this data" + (
                f", {len(records) - len(known)} none (made before fingerprints)" if len(known) < len(records) else "")
        lines.append(f"data set `{name}`: `{fp.get('path')}`, {fp.get('n_images')} images, fingerprint `{fp.get('digest')}`{note}")
    return lines


def _positive_class(records: list[dict[str, Any]]) -> str:
    classes = next((r["classes"] for r in records if isinstance(r.get("classes"), list) and len(r["classes"]) == 2), None)
    return str(classes[1]) if classes else "1"


def _warnings(problems: list[Problem], flags: list[Flag], stage_users: dict[str, list[str]]) -> list[Block]:
    items = []
    for flag in flags:
        text = f"{FLAG_MARK} {flag.message}"
        if flag.stage and stage_users.get(flag.stage):
            text += " Used by encoders " + ", ".join(f"`{e}`" for e in stage_users[flag.stage]) + "."
        items.append(text)
    items += [f"{FLAG_MARK} {p.message}." for p in problems]
    if not items:
        return [Heading(2, "Warnings"), Paragraph("None: no collapsed downstream run, every pretext task with an "
                                                  "accuracy rose above chance, no two runs with identical results.")]
    return [Heading(2, "Warnings"), Bullets(tuple(items))]


def _stage_users(records: list[dict[str, Any]], stages: list[Stage]) -> dict[str, list[str]]:
    """Encoders built on each stage: records whose ``pretrain_dir`` is the stage, and ``stage.json``'s ``encoder``."""
    users: dict[str, set[str]] = {s.folder: set() for s in stages}
    for stage in stages:
        if stage.info.get("encoder"):
            users[stage.folder].add(str(stage.info["encoder"]))
    for record in records:
        folder = record.get("pretrain_dir")
        if folder:
            users.setdefault(str(folder).rstrip("/"), set()).add(str(record["encoder"]))
    return {k: sorted(v) for k, v in users.items()}


def _stage_table(stages: list[Stage]) -> Table:
    rows = []
    for stage in stages:
        losses = [v for v in stage.pretext_loss if v is not None]
        best, chance = stage.best_acc, stage.chance
        left = pretext_left_chance(stage)
        rows.append([Cell(t) for t in (
            f"`{stage.folder}`",
            str(stage.info.get("method", "—")),
            f"`{stage.info.get('chain', '—')}`",
            str(stage.info.get("encoder", "—")),
            str(stage.info.get("seed", "—")),
            str(len(stage.epochs)),
            f"{losses[-1]:.4f}" if losses else "—",
            (f"{100 * best:.2f}%" if best is not None else "—") + (f" {FLAG_MARK}" if left is False else ""),
            f"{100 * chance:.2f}%" if chance is not None else "—",
            duration(float(stage.info["wall_s"])) if isinstance(stage.info.get("wall_s"), int | float) else "—",
        )])
    header = ["stage", "method", "chain", "encoder", "seed", "epochs", "last pretext loss", "best pretext acc", "chance", "time"]
    return Table(header=header, rows=rows, key="stages")


def _downstream_curves(out_dir: Path, agg: Aggregate) -> list[Figure]:
    """For each encoder and protocol that trains with epochs: the curves of one seed (the lowest) per budget.

    The cosine schedule is shown where the encoder has it, else its first schedule; protocols
    without a schedule (linear, knn) have no epochs and no curves.
    """
    result = []
    for encoder in agg.encoders:
        for mode in agg.modes:
            own = [k for k in agg.cells if k.protocol == mode and k.encoder == encoder]
            schedules = [s for s in agg.schedules if any(k.schedule == s for k in own)]
            if not schedules:
                continue
            schedule = schedules[0]
            curves = []
            for budget in agg.budgets:
                runs = agg.cells.get(CellKey(mode, schedule, budget, encoder), [])
                if not runs:
                    continue
                first = min(runs, key=lambda r: (str(r.get("seed")), str(r.get("run"))))
                path = out_dir / str(first.get("run") or "") / "metrics.csv"
                if first.get("run") and path.is_file():
                    columns = read_metrics_csv(path)
                    if columns.get("epoch"):
                        curves.append((f"{format_budget(budget)} (seed {first.get('seed')})", columns))
            if not curves:
                continue
            title = f"{encoder}, {MODE_TITLES.get(mode, mode).lower()}, {schedule} lr: downstream curves"
            result.append(Figure(f"{FIGURES_DIR}/downstream_{safe_name(encoder)}_{mode}.png", title,
                                 draw.downstream_figure(title, curves)))
    return result


def _confusions(agg: Aggregate) -> list[Figure]:
    """Each encoder's best run (highest test balanced accuracy) as a confusion matrix."""
    result = []
    for encoder in agg.encoders:
        runs = [r for k, rs in agg.cells.items() if k.encoder == encoder for r in rs
                if isinstance(r.get("confusion_matrix"), list) and r["confusion_matrix"]
                and isinstance(r.get("test_balanced_acc"), int | float)]
        if not runs:
            continue
        best = max(runs, key=lambda r: (r["test_balanced_acc"], str(r.get("run"))))
        caption = (f"{encoder}: confusion matrix of its best run `{best.get('run')}` "
                   f"(balanced accuracy {100 * best['test_balanced_acc']:.2f}%)")
        title = f"{encoder}: best run {best.get('run')}\nbalanced accuracy {100 * best['test_balanced_acc']:.2f}%"
        try:
            data = draw.confusion_figure(best, title)
        except (TypeError, ValueError) as err:  # a malformed matrix in a record: report it, draw the rest
            log.warning("confusion matrix of %s cannot be drawn: %s", best.get("run"), err)
            continue
        result.append(Figure(f"{FIGURES_DIR}/confusion_{safe_name(encoder)}.png", caption, data))
    return result


def _verdict(out_dir: Path, records: list[dict[str, Any]], figures: list[Figure] | None) -> list[Block]:
    """The verdict section (``report/verdict.py``) and, when ``figures`` is a list, its figure appended to it."""
    def test_predictions(run: str) -> predictions.Predictions | None:
        return predictions.read(out_dir / run / predictions.FILE) if run else None

    section = verdict.blocks(records, test_predictions)
    against = [c for c in verdict.compare(records) if c.kind == verdict.SUPERVISED]
    if figures is not None and against:
        figure = Figure(f"{FIGURES_DIR}/difference_to_supervised.png",
                        "Balanced accuracy minus the supervised baseline against label budget (paired by seed, 95% band)",
                        draw.difference_figure(against))
        figures.append(figure)
        section.insert(2, figure)
    return section


def compose(out_dir: Path, draw_figures: bool = True) -> tuple[list[Block], list[Figure], str]:
    """Read the study folder and lay out the report: (blocks, figures, title). Writes nothing.

    ``draw_figures=False`` leaves the figures out (tables and warnings only), which is much quicker.
    """
    records, problems = read_records(out_dir)
    stages = load_stages(out_dir)
    flags = find_flags(records, stages)
    records = [r for r in records if not is_diverged(r)]  # flagged above; no metrics for the tables
    agg = aggregate(records)
    users = _stage_users(records, stages)
    flagged_runs = {run for f in flags if f.kind not in ("pretext_chance", "embedding_collapsed") for run in f.runs}
    suspicious = {e for f in flags if f.stage for e in users.get(f.stage, [])}
    name = _study_name(out_dir)

    blocks: list[Block] = _header(out_dir, name, records, stages, agg)
    verdict_figures: list[Figure] = []  # drawn inside the verdict section, written with the others
    blocks += _verdict(out_dir, records, verdict_figures if draw_figures else None)
    figures: list[Figure] = []
    blocks += _warnings(problems, flags, users)

    if not records:
        blocks.append(Paragraph("No downstream run has finished yet (`results.jsonl` is missing or empty)."))
    blocks.append(Paragraph(
        ("Rows: labelled images per class (shots), then labelled fraction of the training set. "
         if any(b.kind == "shots" for b in agg.budgets) else "Rows: labelled fraction of the training set. ") +
        "Columns: encoders. Supervised baselines train the whole "
        "network, so they appear in every table, marked *(end to end)* in frozen-encoder tables. "
        f"{FLAG_MARK} on a cell: it holds a flagged run; on a column: its pretext task never left chance "
        "or its encoder collapsed (see Warnings). Which runs make each cell: see *Runs behind each cell*."
    ))
    for metric in METRIC_TABLES:
        if not has_metric(agg, metric):
            continue
        blocks.append(Heading(2, metric.title))
        for mode, schedule in agg.tables():
            blocks.append(build_table(agg, metric, mode, schedule, flagged_runs, suspicious))

    # One figure per schedule (protocols without one are drawn in each) and kind of budget; a panel per protocol.
    kinds = [kind for kind in ("fraction", "shots") if any(b.kind == kind for b in agg.budgets)]
    for kind in kinds if draw_figures else []:
        for index, schedule in enumerate(agg.schedules or [None]):
            path = f"{FIGURES_DIR}/accuracy_vs_{kind}{'' if index == 0 else '_' + safe_name(schedule)}.png"
            against = "label fraction" if kind == "fraction" else "labelled images per class (shots)"
            caption = f"Test accuracy and balanced accuracy against {against}" + (f", {schedule} lr schedule" if schedule else "")
            figures.append(Figure(path, caption, draw.accuracy_vs_fraction_figure(agg, schedule, kind)))
    if figures:
        blocks.append(Heading(2, "Accuracy against label fraction"))
        blocks += figures
    figures += verdict_figures

    if records:
        blocks += [Heading(2, "Runs behind each cell"), runs_table(agg)]

    if stages:
        blocks += [Heading(2, "Pretraining"), _stage_table(stages)]
        for stage in stages if draw_figures else []:
            figure = Figure(f"{FIGURES_DIR}/pretext_{safe_name(stage.name)}.png",
                            f"Pretext curves of `{stage.folder}`", draw.pretext_figure(stage))
            figures.append(figure)
            blocks.append(figure)

    curves = _downstream_curves(out_dir, agg) if draw_figures else []
    if curves:
        blocks.append(Heading(2, "Downstream training curves"))
        blocks.append(Paragraph("One seed (the lowest) per label fraction; train solid, validation dashed."))
        blocks += curves
        figures += curves
    confusions = _confusions(agg) if draw_figures else []
    if confusions:
        blocks.append(Heading(2, "Confusion matrices"))
        blocks += confusions
        figures += confusions
    blocks += _provenance(out_dir)
    return blocks, figures, f"histossl study report: {name}"


def _provenance(out_dir: Path) -> list[Block]:
    """Each command that worked on the study (``invocations.jsonl``), with its machine and versions."""
    runs = provenance.load(out_dir)
    if not runs:
        return []
    rows = []
    for i, run in enumerate(runs, 1):
        status = run.get("status") or "no end recorded (killed, or still running)"
        wall = duration(float(run["wall_s"])) if isinstance(run.get("wall_s"), int | float) else "—"
        rows.append([Cell(text) for text in (str(i), str(run.get("time", "")), wall, status, f"`{run.get('command', '')}`")])
    environments = []
    for run in runs:
        versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
        text = f"{run.get('machine', '?')}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
        if text not in environments:
            environments.append(text)
    finished = sum(float(r["wall_s"]) for r in runs if isinstance(r.get("wall_s"), int | float))
    return [
        Heading(2, "Provenance"),
        Paragraph(f"Commands that worked on this study folder, in order; {duration(finished)} of wall time in all "
                  "(report building excluded)."),
        Table(["#", "started (UTC)", "wall time", "status", "command"], rows, key="provenance"),
        Paragraph("Machines and versions:"),
        Bullets(tuple(environments)),
    ]


def build_report(out_dir: Path, draw_figures: bool = True) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into a study folder; return report.md's path.

    ``draw_figures=False`` writes the tables and warnings only (and removes no figure).

    Raises:
        HistosslError: ``out_dir`` is not a folder, or a file cannot be written.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise HistosslError(f"{out_dir}: no such study folder")
    blocks, figures, title = compose(out_dir, draw_figures)
    written = set()
    for figure in figures:
        atomic_write_bytes(out_dir / figure.path, figure.data)
        written.add(Path(figure.path).name)
    figures_dir = out_dir / FIGURES_DIR
    if draw_figures and figures_dir.is_dir():
        for stale in figures_dir.iterdir():
            if stale.is_file() and _OWN_FIGURE.match(stale.name) and stale.name not in written:
                stale.unlink(missing_ok=True)
    report = out_dir / "report.md"
    atomic_write_text(report, to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks, title))
    return report
