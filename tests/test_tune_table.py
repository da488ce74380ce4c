"""benchmarks/tune_table.py: the tuning rule's word against the base study (better only beyond the variant's spread)."""

import json
from pathlib import Path

from conftest import load_benchmark


def _study(folder: Path, values: list[float], encoder: str = "simclr") -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps({"method": encoder, "encoder": encoder, "protocol": "linear", "seed": s, "label_fraction": 0.05,
                         "val_balanced_acc": v, "test_acc": None, "run": f"downstream/{encoder}__linear__f0.05__s{s}"})
             for s, v in enumerate(values)]
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_variants_are_better_or_worse_only_beyond_their_own_spread(tmp_path, capsys):
    table = load_benchmark("tune_table")
    base = _study(tmp_path / "base", [0.50, 0.52, 0.48])                 # mean 0.50
    better = _study(tmp_path / "better", [0.55, 0.56, 0.54])             # +5.0, std 1.0
    tie = _study(tmp_path / "tie", [0.60, 0.44, 0.52])                   # +2.0, std 8.0
    worse = _study(tmp_path / "worse", [0.40, 0.41, 0.42])               # -9.0, std 1.0
    table.main([base, better, tie, worse], base)
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["base"].endswith("| base |") and "| no |" in rows["base"]
    assert rows["better"].endswith("| +5.0 (better) |")
    assert rows["tie"].endswith("| +2.0 (tie) |")
    assert rows["worse"].endswith("| -9.0 (worse) |")
    table.main([better])  # without a base: the table as before, no comparison column
    assert capsys.readouterr().out.splitlines()[2].endswith("| no |")
