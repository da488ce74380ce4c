"""Copy a study's report into docs/: report.md, report.html, results.jsonl, config.yaml, split.csv,
invocations.jsonl, the methods benchmark's files where present (methods.md, calibration.json,
methods-study.yaml) and the accuracy-against-fraction figure. The other figures stay embedded in the
self-contained report.html; report.md points there instead of to PNG files (fewer binary files in git).
    python benchmarks/publish_report.py out/idc-cpu docs/benchmarks/idc/idc-cpu
"""

import re
import shutil
import sys
from pathlib import Path

KEEP = ("report.html", "results.jsonl", "config.yaml", "split.csv", "invocations.jsonl",
        "methods.md", "calibration.json", "methods-study.yaml")  # the last three: benchmarks/methods.py


def publish(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "figures").mkdir(parents=True)
    for name in KEEP:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    kept = sorted(p for pattern in ("accuracy_vs_*.png", "difference_to_supervised.png") for p in (src / "figures").glob(pattern))
    for figure in kept:
        shutil.copy(figure, dest / "figures" / figure.name)
    names = {f.name for f in kept}

    def link(match: re.Match) -> str:
        path = match.group(2)
        return match.group(0) if Path(path).name in names else f"*Figure: {match.group(1)} (in [report.html](report.html)).*"

    text = (src / "report.md").read_text(encoding="utf-8")
    (dest / "report.md").write_text(re.sub(r"!\[([^\]]*)\]\((figures/[^)]+)\)", link, text), encoding="utf-8")


if __name__ == "__main__":
    publish(Path(sys.argv[1]), Path(sys.argv[2]))
