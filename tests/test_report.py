"""The report: cells, tables, warnings, figures and HTML, built from fake study folders written here."""

import json
import logging
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from histossl.report import aggregate, build_report, compose, format_loss_accuracy, load_records
from histossl.report.document import Table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FRACTIONS = (0.05, 0.25, 1.0)
SEEDS = (0, 1)
CLASSES = ["benign", "malignant"]
# (encoder, method, pretrain_dir, modes)
ENCODERS = (
    ("rotnet", "rotnet", "pretrain/rotnet_target_aaa", ("finetune", "frozen")),
    ("simclr", "simclr", "pretrain/simclr_target_bbb", ("finetune", "frozen")),
    ("supervised", "supervised", None, ("finetune",)),
)
# The cell whose mean ± std the tests check by hand: simclr, finetune, cosine, 25%.
KNOWN_CELL = {0: (0.38, 0.84), 1: (0.40, 0.86)}
COLLAPSED_RUN = "downstream/rotnet__frozen__constant__f1__s1"
COPIED_FROM = "downstream/simclr__finetune__constant__f0.05__s0"
COPIED_TO = "downstream/simclr__frozen__cosine__f0.05__s0"


def _write_csv(path: Path, header: str, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _record(encoder, method, pretrain_dir, mode, schedule, fraction, seed, index) -> dict:
    run = f"downstream/{encoder}__{mode}__{schedule}__f{fraction:g}__s{seed}"
    # Distinct, plausible numbers for every run: no accidental identical (loss, acc) pairs.
    acc = 0.70 + 0.2 * fraction + 0.001 * index + 0.003 * seed
    loss = 0.9 - 0.4 * fraction - 0.0013 * index + 0.0021 * seed
    if (encoder, mode, schedule, fraction) == ("simclr", "finetune", "cosine", 0.25):
        loss, acc = KNOWN_CELL[seed]
    tp = round(acc * 100)
    return {
        "method": method, "pretrain_chain": "none" if method == "supervised" else "random>target",
        "mode": mode, "label_fraction": fraction, "n_labeled": int(400 * fraction), "lr": 1e-3,
        "lr_schedule": schedule, "seed": seed, "epochs": 3, "best_epoch": 2,
        "test_loss": loss, "test_acc": acc, "test_balanced_acc": acc - 0.02, "test_macro_f1": acc - 0.03,
        "test_auroc": min(acc + 0.05, 1.0), "n_test": 100, "wall_s": 1.5,
        "encoder": encoder, "run": run, "pretrain_dir": pretrain_dir, "classes": CLASSES,
        "confusion_matrix": [[tp // 2, 50 - tp // 2], [50 - (tp - tp // 2), tp - tp // 2]],
        "test_majority_acc": 0.6, "config": "config.yaml",
    }


def make_study(out: Path, seeds=SEEDS, flaws: bool = True) -> Path:
    """A finished study: 2 SSL encoders + supervised, 2 modes, 2 schedules, 3 fractions, the given seeds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("name: fake-study\nseeds: [0, 1]\n")
    records = []
    for encoder, method, pretrain_dir, modes in ENCODERS:
        for mode in modes:
            for schedule in ("cosine", "constant"):
                for fraction in FRACTIONS:
                    for seed in seeds:
                        records.append(_record(encoder, method, pretrain_dir, mode, schedule, fraction, seed,
                                               len(records)))
    if flaws:
        by_run = {r["run"]: r for r in records}
        by_run[COLLAPSED_RUN].update(test_loss=1.094, test_acc=0.3856, test_balanced_acc=0.5)
        by_run[COPIED_TO].update(test_loss=by_run[COPIED_FROM]["test_loss"], test_acc=by_run[COPIED_FROM]["test_acc"])
    for record in records:
        _write_csv(out / record["run"] / "metrics.csv", "epoch,train_loss,train_acc,val_loss,val_acc,val_balanced_acc",
                   [(e, 1.0 / e, 0.5 + 0.1 * e, 1.1 / e, 0.45 + 0.1 * e, 0.44 + 0.1 * e) for e in (1, 2, 3)])
    with open(out / "results.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    stages = {
        # rotnet: pretext accuracy stays at chance (0.25) -> flagged
        "rotnet_target_aaa": ("rotnet", 0.25, [0.24, 0.26, 0.255]),
        # simclr: 1/255 chance, accuracy clearly rises -> not flagged
        "simclr_target_bbb": ("simclr", 1 / 255, [0.01, 0.2, 0.45]),
    }
    for stage, (method, chance, accs) in stages.items():
        folder = out / "pretrain" / stage
        _write_csv(folder / "metrics.csv", "epoch,pretext_loss,pretext_acc",
                   [(e + 1, 2.0 - 0.1 * e, a) for e, a in enumerate(accs)])
        (folder / "stage.json").write_text(json.dumps({
            "stage": stage, "method": method, "chain": "random>target", "encoder": method,
            "pretext_chance": chance, "epochs": len(accs), "wall_s": 12.0}))
    (out / "pretrain" / "simclr_other_ccc").mkdir()  # still running: no metrics.csv yet
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = make_study(tmp_path_factory.mktemp("study") / "out")
    build_report(out)
    return out


def _tables(out: Path) -> dict[str, Table]:
    blocks, _, _ = compose(out, draw_figures=False)
    return {b.key: b for b in blocks if isinstance(b, Table)}


def _cell(table: Table, row_label: str, column: str) -> str:
    col = table.header.index(column)
    return next(row[col].text for row in table.rows if row[0].text == row_label)


def test_single_seed_cell_is_exactly_the_contract_format():
    assert format_loss_accuracy([0.3881], [0.8451]) == "0.3881 / 84.51%"


def test_several_seeds_show_mean_and_sample_std(study):
    cell = _cell(_tables(study)["loss_acc/finetune/cosine"], "25%", "simclr")
    losses, accs = [KNOWN_CELL[s][0] for s in SEEDS], [KNOWN_CELL[s][1] for s in SEEDS]
    expected = (f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f} / "
                f"{100 * statistics.mean(accs):.2f}% ± {100 * statistics.stdev(accs):.2f}%")
    assert cell == expected == "0.3900 ± 0.0141 / 85.00% ± 1.41%"
    assert "mean ± sample std over 2 seeds" in (study / "report.md").read_text()


def test_single_seed_study_report_has_plain_cells(tmp_path):
    out = make_study(tmp_path / "out", seeds=(0,), flaws=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record.update(test_loss=0.3881, test_acc=0.8451)
    lines[0] = json.dumps(record)
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    text = build_report(out, draw_figures=False).read_text()
    assert "0.3881 / 84.51%" in text
    assert "±" not in text.split("## Balanced accuracy")[0].split("## Test loss")[1]


def test_tables_for_both_modes_with_fractions_encoders_and_supervised(study):
    tables = _tables(study)
    for mode in ("finetune", "frozen"):
        for schedule in ("cosine", "constant"):
            for metric in ("loss_acc", "balanced_acc", "auroc", "macro_f1"):
                assert f"{metric}/{mode}/{schedule}" in tables
    finetune, frozen = tables["loss_acc/finetune/cosine"], tables["loss_acc/frozen/cosine"]
    assert finetune.header == ["labels", "rotnet ⚠", "simclr", "supervised"]
    assert frozen.header == ["labels", "rotnet ⚠", "simclr", "supervised (end to end)"]
    assert [row[0].text for row in frozen.rows] == ["5%", "25%", "100%"]
    # the end-to-end supervised column of a frozen table shows the supervised runs themselves
    assert _cell(frozen, "100%", "supervised (end to end)") == _cell(finetune, "100%", "supervised")
    assert "—" not in {c.text for row in frozen.rows for c in row}
    md = (study / "report.md").read_text()
    assert "| labels | rotnet ⚠ | simclr | supervised (end to end) |" in md


def test_best_mean_per_row_is_bold(study):
    table = _tables(study)["balanced_acc/finetune/cosine"]
    for row in table.rows:
        values = [float(c.text.split("%")[0]) for c in row[1:]]
        bold = [c.bold for c in row[1:]]
        assert bold == [v == max(values) for v in values]
    assert re.search(r"\| \*\*\d+\.\d\d% ± \d+\.\d\d%\*\* \|", (study / "report.md").read_text())


def test_collapsed_run_flagged_with_its_folder(study):
    md = (study / "report.md").read_text()
    warnings = md.split("## Warnings")[1].split("\n## ")[0]
    line = next(l for l in warnings.splitlines() if COLLAPSED_RUN in l)
    assert "38.56%" in line and "majority" in line
    assert _cell(_tables(study)["loss_acc/frozen/constant"], "100%", "rotnet ⚠").endswith(" ⚠")


def test_below_the_majority_rate_is_not_collapse_for_a_run_chosen_for_balanced_accuracy():
    from histossl.report.flags import collapse_reasons

    run = {"test_acc": 0.30, "test_majority_acc": 0.35, "test_balanced_acc": 0.45, "classes": list("abcdef"), "test_loss": 1.5}
    assert collapse_reasons(run) and "majority" in collapse_reasons(run)[0]
    assert collapse_reasons({**run, "select_metric": "val_balanced_acc"}) == []
    assert collapse_reasons({**run, "threshold": 0.64}) == []
    assert "at chance" in collapse_reasons({**run, "select_metric": "val_balanced_acc", "test_balanced_acc": 0.17})[0]


def test_pretext_at_chance_flagged_and_above_chance_not(study):
    warnings = (study / "report.md").read_text().split("## Warnings")[1].split("\n## ")[0]
    assert "`pretrain/rotnet_target_aaa`" in warnings and "learnt nothing" in warnings
    assert "simclr_target_bbb" not in warnings


def test_identical_results_flagged(study):
    warnings = (study / "report.md").read_text().split("## Warnings")[1].split("\n## ")[0]
    line = next(l for l in warnings.splitlines() if "same test loss" in l)
    assert COPIED_FROM in line and COPIED_TO in line
    assert sum("same test loss" in l for l in warnings.splitlines()) == 1


def test_clean_study_has_no_warnings(tmp_path):
    out = make_study(tmp_path / "out", flaws=False)
    stage = json.loads((out / "pretrain/rotnet_target_aaa/stage.json").read_text())
    (out / "pretrain/rotnet_target_aaa/metrics.csv").write_text("epoch,pretext_loss,pretext_acc\n1,1.3,0.3\n2,1.0,0.6\n")
    assert stage["pretext_chance"] == 0.25
    md = build_report(out, draw_figures=False).read_text()
    assert "## Warnings\n\nNone:" in md and "⚠" not in md.split("## Test loss")[1]


def test_figures_are_pngs_and_linked(study):
    figures = study / "figures"
    expected = {"accuracy_vs_fraction.png", "accuracy_vs_fraction_constant.png",
                "pretext_rotnet_target_aaa.png", "pretext_simclr_target_bbb.png",
                "downstream_rotnet_finetune.png", "downstream_rotnet_frozen.png",
                "downstream_simclr_frozen.png", "downstream_supervised_finetune.png",
                "confusion_rotnet.png", "confusion_simclr.png", "confusion_supervised.png"}
    names = {p.name for p in figures.glob("*.png")}
    assert expected <= names
    assert not any("simclr_other_ccc" in n for n in names)  # a stage without metrics.csv is skipped
    md = (study / "report.md").read_text()
    for name in names:
        assert (figures / name).read_bytes().startswith(PNG_MAGIC)
        assert f"](figures/{name})" in md


def test_html_is_self_contained_and_has_the_tables(study):
    page = (study / "report.html").read_text()
    sources = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    assert page.count("<table>") == (study / "report.md").read_text().count("\n|---")
    assert "0.3900 ± 0.0141 / 85.00% ± 1.41%" in page


def test_rebuild_from_records_is_identical_and_survives_a_truncated_line(study, tmp_path, caplog):
    first = (study / "report.md").read_text()
    assert build_report(study).read_text() == first
    out = make_study(tmp_path / "out")
    with open(out / "results.jsonl", "a") as f:
        f.write('{"method": "simclr", "mode": "fine')  # a run killed while appending its record
    with caplog.at_level(logging.WARNING):
        records = load_records(out)
        text = build_report(out, draw_figures=False).read_text()
    assert len(records) == len(load_records(study))
    assert "results.jsonl line" in caplog.text
    assert "is not valid JSON" in text
    # the tables themselves are unchanged by the broken line
    def tables(md: str) -> str:
        return re.split(r"\n## (?:Accuracy against|Runs behind)", md.split("## Test loss")[1])[0]

    assert tables(text) == tables(first) and "0.3900 ± 0.0141 / 85.00% ± 1.41%" in tables(text)


def test_aggregate_ignores_record_order(study):
    records = load_records(study)
    forward, backward = aggregate(records), aggregate(list(reversed(records)))
    assert forward.encoders == backward.encoders == ["rotnet", "simclr", "supervised"]
    assert forward.tables() == backward.tables()


def test_report_imports_no_torch():
    """``histossl report`` must run where torch is not installed: the package never imports it."""
    code = "import sys, histossl.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_provenance_lists_each_command_and_a_killed_one(tmp_path):
    out = make_study(tmp_path / "out", seeds=(0,), flaws=False)
    base = {"machine": "CPU Test, 2 cores", "versions": {"torch": "9.9"}}
    lines = [
        {"id": "a", "event": "start", "time": "2026-01-01T00:00:00Z", "command": "histossl study s.yaml", **base},
        {"id": "b", "event": "start", "time": "2026-01-01T01:00:00Z", "command": "histossl study s.yaml", **base},
        {"id": "b", "event": "end", "time": "2026-01-01T01:30:00Z", "status": "finished", "wall_s": 1800.0},
    ]
    (out / "invocations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = build_report(out, draw_figures=False).read_text()
    section = text.split("## Provenance")[1]
    assert "no end recorded (killed, or still running)" in section and "| finished |" in section
    assert "CPU Test, 2 cores; torch 9.9" in section and "30.0 min" in section


def test_header_says_when_thresholds_were_chosen_on_validation(tmp_path):
    out = make_study(tmp_path / "out", seeds=(0,), flaws=False)
    assert "Decision threshold" not in build_report(out, draw_figures=False).read_text()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for i, record in enumerate(lines):
        record.update(threshold=0.3 + 0.1 * (i % 3), classes=["non-IDC", "IDC"])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = build_report(out, draw_figures=False).read_text()
    assert f"for {len(lines)} of {len(lines)} runs (probability of class `IDC`, range 0.30-0.50)" in text
