"""Copy a study's report into docs/: report.md, report.html, results.jsonl, config.yaml, split.csv,
invocations.jsonl, the methods benchmark's files where present (methods.md, calibration.json,
methods-study.yaml) and the accuracy-against-fraction figure. The other figures stay embedded in the
self-contained report.html; report.md points there instead of to PNG files (fewer binary files in git).
A report.html over 1 MiB (a study with many pretraining stages embeds every curve) stays in the study
folder: report.md then says the figure is in the study's report.html, which is not committed.
    python benchmarks/publish_report.py out/idc-cpu docs/benchmarks/idc/idc-cpu
"""

import re
import shutil
import sys
from pathlib import Path

HTML_LIMIT = 1 << 20  # bytes
KEEP = ("report.html", "results.jsonl", "config.yaml", "split.csv", "invocations.jsonl",
        "methods.md", "calibration.json", "methods-study.yaml")  # the last three: benchmarks/methods.py


def publish(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "figures").mkdir(parents=True)
    html = src / "report.html"
    with_html = html.is_file() and html.stat().st_size <= HTML_LIMIT
    for name in KEEP:
        if (src / name).is_file() and (name != "report.html" or with_html):
            shutil.copy(src / name, dest / name)
    where = "in [report.html](report.html)" if with_html else "in the study folder's report.html, too large to commit"
    kept = sorted(p for pattern in ("accuracy_vs_*.png", "difference_to_supervised.png") for p in (src / "figures").glob(pattern))
    for figure in kept:
        shutil.copy(figure, dest / "figures" / figure.name)
    names = {f.name for f in kept}

    def link(match: re.Match) -> str:
        path = match.group(2)
        return match.group(0) if Path(path).name in names else f"*Figure: {match.group(1)} ({where}).*"

    text = (src / "report.md").read_text(encoding="utf-8")
    (dest / "report.md").write_text(re.sub(r"!\[([^\]]*)\]\((figures/[^)]+)\)", link, text), encoding="utf-8")


if __name__ == "__main__":
    publish(Path(sys.argv[1]), Path(sys.argv[2]))
