"""Copy a study's report into docs/: report.md, report.html, results.jsonl, config.yaml, split.csv,
subsets.json (the labelled images of each seed and budget), invocations.jsonl, plan.json (the runs planned: a partial study says so), the methods benchmark's
files where present (methods.md, calibration.json, methods-study.yaml), each pretraining stage's description and curves (``pretrain/<stage>/stage.json``
and ``metrics.csv``; not its weights) and the accuracy-against-fraction figure. The other figures stay embedded in the
self-contained report.html; report.md points there instead of to PNG files (fewer binary files in git).
A report.html over 1 MiB (a study with many pretraining stages embeds every curve) stays in the study
folder: report.md then says the figure is in the study's report.html, which is not committed.
    python benchmarks/publish_report.py out/idc-cpu docs/benchmarks/idc/idc-cpu

``--restore DOCS OUT`` goes the other way, for a study whose folder was lost: it copies the records,
config, split and stage descriptions back into a new study folder, and rerunning the study's command
there runs only the missing runs, retraining only the encoders those runs read. A retrained encoder
is the first one bit for bit only with the same code on the same kind of CPU: its ``stage.json`` says
whether its curve matched the published one (``remade.same_curve``) and the report flags it when not.
    python benchmarks/publish_report.py --restore docs/benchmarks/methods-ebhi/adamw out/methods-ebhi
"""

import re
import shutil
import sys
from pathlib import Path

from histossl.report.records import FIRST_TRAINING, STAGE_FILES, described_by

HTML_LIMIT = 1 << 20  # bytes
KEEP = ("report.html", "results.jsonl", "config.yaml", "split.csv", "subsets.json", "invocations.jsonl", "plan.json",
        "methods.md", "calibration.json", "methods-study.yaml")  # the last three: benchmarks/methods.py
# A study writes its subsets.json anew from the split and its seeds: not restored.
RESTORE = tuple(name for name in KEEP if name not in ("report.html", "methods.md", "subsets.json"))


def copy_stages(src: Path, dest: Path) -> None:
    """``pretrain/<stage>/stage.json`` and ``metrics.csv`` of every stage of ``src``, into ``dest``; of a
    stage stopped while trained again after a restore, its first training's (``report.records.described_by``),
    so the next restore still has them."""
    described = (STAGE_FILES[0], FIRST_TRAINING[0])
    for folder in sorted({p.parent for name in described for p in (src / "pretrain").glob(f"*/{name}")}):
        (dest / "pretrain" / folder.name).mkdir(parents=True, exist_ok=True)
        for source, name in zip(described_by(folder), STAGE_FILES):
            if source.is_file():
                shutil.copy(source, dest / "pretrain" / folder.name / name)


def publish(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "figures").mkdir(parents=True)
    html = src / "report.html"
    with_html = html.is_file() and html.stat().st_size <= HTML_LIMIT
    for name in KEEP:
        if (src / name).is_file() and (name != "report.html" or with_html):
            shutil.copy(src / name, dest / name)
    copy_stages(src, dest)
    where = "in [report.html](report.html)" if with_html else "in the study folder's report.html, too large to commit"
    kept = sorted(p for pattern in ("accuracy_vs_*.png", "difference_to_supervised.png") for p in (src / "figures").glob(pattern))
    for figure in kept:
        shutil.copy(figure, dest / "figures" / figure.name)
    names = {f.name for f in kept}
    if not (src / "report.md").is_file():  # a tuning study (downstream.test: false) writes no report
        return

    def link(match: re.Match) -> str:
        path = match.group(2)
        return match.group(0) if Path(path).name in names else f"*Figure: {match.group(1)} ({where}).*"

    text = (src / "report.md").read_text(encoding="utf-8")
    (dest / "report.md").write_text(re.sub(r"!\[([^\]]*)\]\((figures/[^)]+)\)", link, text), encoding="utf-8")


def restore(docs: Path, out: Path) -> None:
    if (out / "results.jsonl").exists():
        sys.exit(f"{out / 'results.jsonl'} exists: restore into a new folder (nothing copied)")
    out.mkdir(parents=True, exist_ok=True)
    for name in RESTORE:
        if (docs / name).is_file():
            shutil.copy(docs / name, out / name)
    copy_stages(docs, out)


if __name__ == "__main__":
    if sys.argv[1] == "--restore":
        restore(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        publish(Path(sys.argv[1]), Path(sys.argv[2]))
