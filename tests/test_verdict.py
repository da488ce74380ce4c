"""The verdict (report/verdict.py), its place in the report, and ``histossl compare``; records written here."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from histossl import predictions
from histossl.cli import main
from histossl.io import atomic_write_text
from histossl.report import build_report
from histossl.report import verdict
from histossl.report.records import read_records


def _record(encoder, value, seed, fraction=0.05, mode="finetune", schedule="cosine", **extra):
    method = "supervised" if encoder.startswith("supervised") else encoder
    return {"encoder": encoder, "method": method, "mode": mode, "lr_schedule": schedule, "label_fraction": fraction,
            "seed": seed, "test_balanced_acc": value, "test_loss": 0.5, "test_acc": value,
            "run": f"downstream/{encoder}__{mode}__{schedule}__f{fraction:g}__s{seed}", **extra}


def _pair(a_values, b_values, fraction=0.05, encoder="simclr"):
    return ([_record(encoder, v, s, fraction) for s, v in enumerate(a_values)]
            + [_record("supervised", v, s, fraction) for s, v in enumerate(b_values)])


def test_verdict_wording_for_a_known_set_of_records():
    # 5%: differences 0.10, 0.05, 0.10 (p = 1 - 5/sqrt(27) = 0.0377, CI +1.2 to +15.5): shown.
    # 25%: differences 0.02, -0.01, 0.03 (CI contains 0; 12 paired seeds by hand, see test_stats): not shown.
    records = _pair([0.80, 0.70, 0.90], [0.70, 0.65, 0.80]) + _pair([0.82, 0.79, 0.83], [0.80, 0.80, 0.80], 0.25)
    comparisons = verdict.compare(records)
    assert len(comparisons) == 2 and all(c.n_tests == 2 for c in comparisons)
    lines = verdict.verdict_lines(comparisons)
    assert lines[0] == ("5% labels: simclr (fine-tuned) beats supervised by +8.3 points balanced accuracy, "
                        "95% CI +1.2 to +15.5, 3 paired seeds, Holm-adjusted p = 0.075: not shown "
                        "(the interval excludes 0, but not after Holm's correction over 2 comparisons)")
    assert lines[1].startswith("25% labels: simclr (fine-tuned) beats supervised by +1.3 points balanced accuracy, 95% CI -3.8 to +6.5, 3 paired seeds")
    assert lines[1].endswith(": not shown (about 12 paired seeds would be needed to show it)")
    alone = verdict.verdict_lines(verdict.compare(records[:6]))  # one test: Holm p = p
    assert alone == ["5% labels: simclr (fine-tuned) beats supervised by +8.3 points balanced accuracy, "
                     "95% CI +1.2 to +15.5, 3 paired seeds, Holm-adjusted p = 0.038: shown"]


def test_a_budget_without_a_supervised_run_says_so_in_the_report(tmp_path):
    records = _pair([0.80, 0.70], [0.70, 0.65]) + [_record("simclr", v, s, 0.25, mode="linear", schedule=None) for s, v in enumerate([0.8, 0.7])]
    (block,) = [b for b in verdict.blocks(records) if hasattr(b, "items")]
    assert block.items[0].startswith("5% labels: simclr (fine-tuned) beats supervised")
    assert block.items[1] == "25% labels: no supervised run at this budget, no verdict"


def test_one_seed_has_no_interval_and_is_never_shown():
    lines = verdict.verdict_lines(verdict.compare(_pair([0.9], [0.6])))
    assert lines == ["5% labels: simclr (fine-tuned) beats supervised by +30.0 points balanced accuracy, "
                     "1 seed: no interval: not shown (run more seeds)"]


def test_best_encoder_against_supervised_and_runner_up_with_protocol_and_shots():
    records = (_pair([0.80, 0.81, 0.82], [0.70, 0.72, 0.71])
               + [_record("rotnet", v, s, mode="frozen") for s, v in enumerate([0.60, 0.62, 0.61])])
    for r in records:  # new records: protocol and shots, label_fraction null
        r["protocol"], r["shots"], r["label_fraction"] = r.pop("mode"), 10, None
    comparisons = verdict.compare(records)
    kinds = sorted((c.kind, c.a.encoder, c.b.encoder, c.a.key[1]) for c in comparisons)
    # The frozen rotnet is compared with the end-to-end supervised runs; one encoder per protocol: no runner-up.
    assert kinds == [("vs supervised", "rotnet", "supervised", "frozen"), ("vs supervised", "simclr", "supervised", "finetune")]
    (line,) = verdict.verdict_lines(comparisons)
    assert line.startswith("10 labelled images per class: simclr (fine-tuned) beats supervised by +10.0 points")
    two = verdict.compare(_pair([0.80, 0.81, 0.82], [0.70, 0.72, 0.71]) + [_record("byol", v, s) for s, v in enumerate([0.7, 0.8, 0.9])])
    runner_up = [c for c in two if c.kind == verdict.RUNNER_UP]
    assert [(c.a.encoder, c.b.encoder) for c in runner_up] == [("simclr", "byol")]


def test_never_shown_when_the_interval_contains_zero():
    rng = np.random.default_rng(0)
    seen_shown = 0
    for trial in range(200):
        n = int(rng.integers(1, 6))
        shift = float(rng.normal(0, 0.05))
        base = rng.uniform(0.5, 0.9, n)
        records = _pair(list(base + shift + rng.normal(0, 0.02, n)), list(base))
        records += [_record("byol", v, s) for s, v in enumerate(base + rng.normal(0, 0.03, n))]
        for c in verdict.compare(records):
            text = verdict.describe(c)
            if c.shown:
                seen_shown += 1
                d = c.paired.difference
                assert d.has_interval and (d.low > 0 or d.high < 0) and c.holm_p < 0.05 and c.n >= 2
                assert text.endswith(": shown")
            else:
                assert "not shown" in text and not text.endswith(": shown")
    assert seen_shown > 10  # the loop did exercise both outcomes


def _write_predictions(out: Path, run: str, labels, preds, groups) -> None:
    paths = [f"{g}/{i}.png" for i, g in enumerate(groups)]
    predictions.write(out / run / predictions.FILE, paths, list(groups), [str(x) for x in labels], [str(x) for x in preds])


def _write_study(out: Path, records, split="path,label,group,split\na.png,0,p1,test\n") -> Path:
    import json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / "split.csv", split)
    return out


def test_single_seed_line_quotes_the_test_group_bootstrap(tmp_path):
    rng = np.random.default_rng(1)
    groups = np.repeat([f"patient{i}" for i in range(8)], 25)
    labels = rng.integers(0, 2, len(groups))
    good = np.where(rng.random(len(groups)) < 0.9, labels, 1 - labels)
    poor = np.where(rng.random(len(groups)) < 0.6, labels, 1 - labels)
    records = _pair([0.9], [0.6])
    _write_study(tmp_path, records)
    _write_predictions(tmp_path, records[0]["run"], labels, good, groups)
    _write_predictions(tmp_path, records[1]["run"], labels, poor, groups)
    found = verdict.compare(read_records(tmp_path)[0], lambda run: predictions.read(tmp_path / run / predictions.FILE))
    (line,) = verdict.verdict_lines(found)
    assert "1 seed: no interval over seeds (bootstrap over 8 test groups: " in line  # groups, not 200 images
    assert line.endswith("test sampling only): not shown (run more seeds)")
    report = build_report(tmp_path, draw_figures=False).read_text()
    assert "(bootstrap, 8 test groups)" in report  # the per-cell table of the single runs


def test_report_opens_with_the_verdict_and_draws_its_figure(tmp_path):
    records = _pair([0.80, 0.70, 0.90], [0.70, 0.65, 0.80]) + _pair([0.82, 0.79, 0.83], [0.80, 0.80, 0.80], 0.25)
    _write_study(tmp_path, records)
    report = build_report(tmp_path).read_text()
    assert report.index("## Verdict") < report.index("## Warnings") < report.index("## Balanced accuracy")
    assert "- 5% labels: simclr (fine-tuned) beats supervised by +8.3 points" in report
    assert "| 5% labels | fine-tuned | cosine | simclr − supervised | 3 | +8.3 | +1.2 to +15.5 | 0.038 | 0.075 | not shown | — |" in report
    assert (tmp_path / "figures" / "difference_to_supervised.png").read_bytes()[:4] == b"\x89PNG"
    assert "Verdict" in (tmp_path / "report.html").read_text()


def test_compare_two_studies_paired_by_seed(tmp_path, capsys):
    a = _write_study(tmp_path / "a", _pair([0.80, 0.70, 0.90], [0.70, 0.65, 0.80]))
    b = _write_study(tmp_path / "b", _pair([0.90, 0.75, 1.00], [0.70, 0.65, 0.80]))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "split.csv identical" in out
    # simclr: B - A = 0.10, 0.05, 0.10 (the hand-computed pair); supervised: identical, no spread to test.
    assert "| 5% labels | fine-tuned | cosine | simclr | 80.00% ± 10.00 (n=3) | 88.33% ± 12.58 (n=3) | +8.3 | +1.2 to +15.5 | 3 | 0.038 | 0.038 | shown |" in out
    assert "| supervised |" in out and "2 cells in both; 1 shown" in out
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.md")]) == 0
    assert "| simclr |" in (tmp_path / "c.md").read_text()


def test_compare_names_no_lr_schedule_for_a_protocol_without_one(tmp_path, capsys):
    records = [{**r, "protocol": "linear", "lr_schedule": None} for r in _pair([0.8, 0.7, 0.9], [0.7, 0.6, 0.8])]
    a = _write_study(tmp_path / "a", records)
    b = _write_study(tmp_path / "b", records)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| 5% labels | linear probe | — | simclr |" in out and "None" not in out


def test_compare_refuses_different_splits_or_subsets(tmp_path, capsys):
    a = _write_study(tmp_path / "a", _pair([0.8, 0.7], [0.7, 0.6]))
    b = _write_study(tmp_path / "b", _pair([0.8, 0.7], [0.7, 0.6]), split="path,label,group,split\na.png,0,p1,train\n")
    assert main(["compare", str(a), str(b)]) == 1
    assert "split.csv differ" in capsys.readouterr().err
    shutil.copy(a / "split.csv", b / "split.csv")
    atomic_write_text(a / "subsets.json", '{"0": {"0.05": {"n": 1, "paths": ["a.png"]}}}')
    atomic_write_text(b / "subsets.json", '{"0": {"0.05": {"n": 1, "paths": ["b.png"]}}}')
    assert main(["compare", str(a), str(b)]) == 1
    assert "subsets.json differ" in capsys.readouterr().err
    (b / "subsets.json").unlink()
    assert main(["compare", str(a), str(b)]) == 1
    assert "missing while the other study has one" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "nowhere")]) == 1


def test_protocols_without_a_schedule_are_compared_with_the_supervised_baseline():
    records = []
    for seed, (ssl, sup) in enumerate([(0.60, 0.50), (0.62, 0.51), (0.61, 0.49)]):
        records.append({"encoder": "simclr", "method": "simclr", "protocol": "linear", "lr_schedule": None,
                        "label_fraction": 0.05, "shots": None, "seed": seed, "test_balanced_acc": ssl})
        records.append({"encoder": "supervised", "method": "supervised", "protocol": "finetune", "lr_schedule": "cosine",
                        "label_fraction": 0.05, "shots": None, "seed": seed, "test_balanced_acc": sup})
    (line,) = verdict.verdict_lines(verdict.compare(records))
    assert line.startswith("5% labels: simclr (linear probe) beats supervised by +11.0 points")


def test_a_protocol_without_a_schedule_is_not_named_with_a_none_lr():
    # Linear (no schedule) beside fine-tuning (cosine): one schedule only, so no "cosine lr" nor "None lr".
    records = []
    for seed, (lin, ft, sup) in enumerate([(0.60, 0.55, 0.50), (0.62, 0.56, 0.51), (0.61, 0.54, 0.49)]):
        for protocol, schedule, encoder, value in (("linear", None, "simclr", lin), ("finetune", "cosine", "simclr", ft),
                                                   ("finetune", "cosine", "supervised", sup)):
            records.append({"encoder": encoder, "method": encoder, "protocol": protocol, "lr_schedule": schedule,
                            "label_fraction": 0.05, "shots": None, "seed": seed, "test_balanced_acc": value})
    (line,) = verdict.verdict_lines(verdict.compare(records))
    assert line.startswith("5% labels: simclr (linear probe) beats supervised by +11.0 points"), line


def test_label_efficiency_is_the_mean_per_seed_ratio_to_supervised_with_all_labels():
    from scipy import stats

    records = (_pair([0.45, 0.50, 0.40], [0.35, 0.30, 0.40])  # 5%: simclr, supervised
               + [_record("simclr", v, s, 0.05, mode="linear", schedule=None) for s, v in enumerate([0.30, 0.30, 0.30])]
               + _pair([0.55, 0.60, 0.50], [0.50, 0.50, 0.40], 1.0))  # 100%
    line = verdict.efficiency_line(verdict.cells_of(records))
    ratios = np.array([0.45 / 0.50, 0.50 / 0.50, 0.40 / 0.40])  # simclr fine-tuned at 5% / supervised at 100%, per seed
    # (supervised at 5%: 0.70, 0.60, 1.00, mean 0.767, std 0.208: 25% to 128%)
    half = stats.t.ppf(0.975, 2) * ratios.std(ddof=1) / np.sqrt(3)
    # mean 0.967, std 0.0577, t(0.975, 2) = 4.303: half-width 0.143
    assert f"{100 * (ratios.mean() - half):.0f}% to {100 * (ratios.mean() + half):.0f}%" == "82% to 111%"
    assert line == ("Label efficiency: with 5% labels, simclr (fine-tuned) reaches 45.0% balanced accuracy, 97% of "
                    "supervised with 100% labels (46.7%; 95% CI 82% to 111%, 3 paired seeds); supervised with 5% labels "
                    "reaches 35.0%, 77% of it (95% CI 25% to 128%, 3 paired seeds)")
    (bullets,) = [b for b in verdict.blocks(records) if hasattr(b, "items")]
    assert bullets.items[-1] == line
    # No supervised run with every label, or no encoder below 100%: no line.
    assert verdict.efficiency_line(verdict.cells_of(records[:9])) is None
    assert verdict.efficiency_line(verdict.cells_of(records[9:])) is None
