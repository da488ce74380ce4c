"""A study's results as one markdown table, the layout of the README's result tables: one row per
protocol and label budget, one column per encoder, each cell the test balanced accuracy (%) mean ± std
over seeds with the mean AUROC in brackets; the supervised baseline's fine-tuned cell is repeated on
the rows of the other protocols (marked *e2e*, end to end). The same numbers are in the study's
report.md, one table per metric.

  python benchmarks/summary_table.py docs/benchmarks/ebhi/ebhi-cpu/results.jsonl
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

PROTOCOLS = {"finetune": "fine-tuned", "frozen": "frozen", "linear": "linear", "knn": "kNN"}
SEEDS_EXPECTED = {3, 5}  # a cell with another number of seeds says n=


def cell(values: list[tuple[float, float]], tag: str = "") -> str:
    """``mean ± std (AUROC)`` of (balanced accuracy, AUROC) pairs, ``—`` for none."""
    if not values:
        return "—"
    acc = np.array([v[0] for v in values]) * 100
    text = f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}" if len(acc) > 1 else f"{acc.mean():.1f}"
    count = "" if len(acc) in SEEDS_EXPECTED else f" (n={len(acc)})"
    return f"{text} ({np.mean([v[1] for v in values]):.3f}){count}{tag}"


def table(records: list[dict]) -> str:
    cells: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    encoders: list[str] = []
    for r in records:
        if r.get("test_balanced_acc") is None:
            continue
        encoders += [] if r["encoder"] in encoders else [r["encoder"]]
        key = (r["protocol"], r.get("label_fraction"), r.get("shots"), r["encoder"])
        cells[key].append((r["test_balanced_acc"], r["test_auroc"]))
    baselines = [e for e in encoders if e.startswith("supervised")]
    ssl = [e for e in encoders if e not in baselines]
    budgets = sorted({(k[1] or 0, k[2] or 0) for k in cells}, key=lambda b: (b[0] == 0, b[0], b[1]))
    lines = ["| labels | protocol | " + " | ".join(ssl + baselines) + " |", "|---|---|" + "---|" * len(ssl + baselines)]
    for protocol, name in PROTOCOLS.items():
        for fraction, shots in budgets:
            row = [cell(cells.get((protocol, fraction or None, shots or None, e), [])) for e in ssl]
            if all(c == "—" for c in row):
                continue
            tag = "" if protocol == "finetune" else " *e2e*"
            row += [cell(cells.get(("finetune", fraction or None, shots or None, e), []), tag) for e in baselines]
            label = f"{fraction * 100:g}%" if fraction else f"{shots} per class"
            lines.append(f"| {label} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(table(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
