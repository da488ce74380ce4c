"""A study's results as one markdown table, the layout of the README's result tables: one row per
protocol (and lr schedule, where a study has several) and label budget, one column per encoder, each
cell the test balanced accuracy (%) mean ± std over seeds with the mean AUROC in brackets; the
supervised baseline's fine-tuned cell is repeated on the rows of the other protocols (marked *e2e*,
end to end). The cells are the report's own (``histossl.report.verdict.cells_of``): the same numbers
are in the study's report.md, one table per metric.

  python benchmarks/summary_table.py docs/benchmarks/ebhi/ebhi-cpu/results.jsonl
"""

import json
import sys
from pathlib import Path

from histossl.report.verdict import PROTOCOL_ORDER, StudyCell, cells_of
from histossl.stats import t_interval

NAMES = {"finetune": "fine-tuned", "frozen": "frozen", "linear": "linear", "knn": "kNN"}
SEEDS_EXPECTED = {3, 5}  # a cell with another number of seeds says n=


def cell(accuracy: StudyCell | None, auroc: StudyCell | None, tag: str = "") -> str:
    """``mean ± std (AUROC)`` of a cell, ``—`` for none."""
    if accuracy is None:
        return "—"
    i = t_interval([100 * v for v in accuracy.values.values()])
    text = f"{i.mean:.1f} ± {i.std:.1f}" if i.n > 1 else f"{i.mean:.1f}"
    roc = f" ({t_interval(list(auroc.values.values())).mean:.3f})" if auroc else ""
    count = "" if i.n in SEEDS_EXPECTED else f" (n={i.n})"
    return f"{text}{roc}{count}{tag}"


def label(budget: tuple[str, float]) -> str:
    kind, value = budget
    return f"{value:g} per class" if kind == "shots" else f"{100 * value:g}%"


def table(records: list[dict]) -> str:
    accuracy, auroc = cells_of(records, "test_balanced_acc"), cells_of(records, "test_auroc")
    baselines = list(dict.fromkeys(c.encoder for c in accuracy.values() if c.supervised))
    encoders = [e for e in dict.fromkeys(c.encoder for c in accuracy.values()) if e not in baselines]
    budgets = sorted({k[0] for k in accuracy}, key=lambda b: (b[0] == "shots", b[1]))  # fractions, then shots
    schedules = {k[2] for k in accuracy if k[2] != "None"}
    rows = sorted({k[1:3] for k in accuracy if k[3] in encoders}, key=lambda p: ((PROTOCOL_ORDER + (p[0],)).index(p[0]), p[1] != "cosine", p[1]))
    baseline_schedule = "cosine" if "cosine" in schedules or not schedules else min(schedules)  # for the rows without one
    lines = ["| labels | protocol | " + " | ".join(encoders + baselines) + " |", "|---|---|" + "---|" * len(encoders + baselines)]
    for protocol, schedule in rows:
        name = NAMES.get(protocol, protocol) + (f" ({schedule})" if len(schedules) > 1 and schedule != "None" else "")
        for budget in budgets:
            row = [cell(accuracy.get(k), auroc.get(k)) for k in ((budget, protocol, schedule, e) for e in encoders)]
            if all(c == "—" for c in row):
                continue
            tag = "" if protocol == "finetune" else " *e2e*"
            row += [cell(accuracy.get(k), auroc.get(k), tag) for k in ((budget, "finetune", schedule if schedule != "None" else baseline_schedule, e) for e in baselines)]
            lines.append(f"| {label(budget)} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    records = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    print(table(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
